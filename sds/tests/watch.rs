//! Changes of a source reach an open stream without polling: the poll interval is an hour
//! in every test here, so only the file watch can deliver them in time.
//!
//! - local store: `ca rotate --phase prepare` and a bundle update reach `ROOTCA`;
//! - files: a file changed in place, files replaced by rename, and a Kubernetes-style
//!   `..data` symlink swap each reach the stream.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use meshca::rotation::Request;
use meshca::store::rotate::RotateOptions;
use meshca_sds::{Listen, ServeConfig, Server, SourceConfig};

/// Far longer than any test: a change that arrives came through the watch.
const NO_POLL: Duration = Duration::from_secs(3600);
/// How long a change may take to arrive (generous for a loaded CI machine; the measured
/// time is printed).
const DEADLINE: Duration = Duration::from_secs(5);

async fn start_unpolled(home: &Home, source: SourceConfig) -> (Server, Client) {
    let sock = home.tmp().join("sds.sock");
    let mut cfg = ServeConfig::new(source, vec![Listen::Unix(sock.clone())]);
    cfg.rotation.poll_interval = NO_POLL;
    let server = Server::start(cfg).await.unwrap();
    let client = Client::new(unix_channel(&sock).await);
    (server, client)
}

/// Opens a stream for `names`, reads and ACKs the first response of each.
async fn open(client: &mut Client, names: &[&str]) -> Sotw {
    let mut s = Sotw::open(client, names).await;
    for _ in names {
        let r = s.recv().await;
        s.send(req(names, &r.nonce, &r.version_info, None)).await;
    }
    s.quiet(Duration::from_millis(300)).await;
    s
}

/// Waits for the next response (at most [`DEADLINE`]), ACKs it and returns its secret.
async fn next(
    s: &mut Sotw,
    names: &[&str],
    what: &str,
) -> envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret {
    let t = Instant::now();
    let r = tokio::time::timeout(DEADLINE, s.rx.message())
        .await
        .unwrap_or_else(|_| {
            panic!("{what}: nothing pushed within {DEADLINE:?} (poll interval {NO_POLL:?})")
        })
        .unwrap()
        .expect("stream ended");
    eprintln!("{what}: pushed after {:?}", t.elapsed());
    s.send(req(names, &r.nonce, &r.version_info, None)).await;
    decode(&r.resources[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store_changes_reach_open_streams_without_polling() {
    let home = Home::new().await;
    let (server, mut client) =
        start_unpolled(&home, local_source(&home, Some(Duration::from_secs(3600)))).await;
    let names = ["default", "ROOTCA"];
    let mut s = open(&mut client, &names).await;

    home.set_bundle("mesh", &["ca1", "ca2"]).await;
    let r = next(&mut s, &names, "bundle update").await;
    assert_eq!(r.name, "ROOTCA");
    assert_eq!(bundle_len(&r), 2);

    home.set_bundle("mesh", &["ca1"]).await;
    assert_eq!(
        bundle_len(&next(&mut s, &names, "bundle update back").await),
        1
    );

    home.rotate_ca1(Request::Prepare, RotateOptions::default())
        .await
        .unwrap();
    let r = next(&mut s, &names, "ca rotate --phase prepare").await;
    assert_eq!(r.name, "ROOTCA");
    assert_eq!(bundle_len(&r), 2, "old and new root");
    // Our own reads and ledger writes are not changes: nothing more is pushed.
    s.quiet(Duration::from_millis(800)).await;
    server.shutdown().await.unwrap();
}

fn files_source(dir: &Path) -> SourceConfig {
    SourceConfig::Files {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca: dir.join("ca.crt"),
        expected: None,
    }
}

fn rd(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// A directory of plain files (no symlinks): tls.crt and tls.key from ca1, ca.crt = ca1.
async fn plain_dir(home: &Home) -> std::path::PathBuf {
    let dir = home.tmp().join("plain");
    std::fs::create_dir_all(&dir).unwrap();
    let (c, k) = home.client_cert("ca1", "w1").await;
    std::fs::write(dir.join("tls.crt"), rd(&c)).unwrap();
    std::fs::write(dir.join("tls.key"), rd(&k)).unwrap();
    std::fs::write(dir.join("ca.crt"), home.root_pem("ca1").await).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_in_place_reaches_open_streams_without_polling() {
    let home = Home::new().await;
    let dir = plain_dir(&home).await;
    let (server, mut client) = start_unpolled(&home, files_source(&dir)).await;
    let names = ["default", "ROOTCA"];
    let mut s = open(&mut client, &names).await;

    // Rewritten in place (same inode: truncate and write).
    {
        use std::io::Write;
        let both = format!(
            "{}{}",
            home.root_pem("ca1").await,
            home.root_pem("ca2").await
        );
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(dir.join("ca.crt"))
            .unwrap();
        f.write_all(both.as_bytes()).unwrap();
    }
    let r = next(&mut s, &names, "ca.crt changed in place").await;
    assert_eq!(r.name, "ROOTCA");
    assert_eq!(bundle_len(&r), 2);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_replaced_by_rename_reach_open_streams_without_polling() {
    let home = Home::new().await;
    let dir = plain_dir(&home).await;
    let (server, mut client) = start_unpolled(&home, files_source(&dir)).await;
    let names = ["default"];
    let mut s = open(&mut client, &names).await;
    let before = leaf_serial(&decode(
        &client
            .fetch_secrets(req(&names, "", "", None))
            .await
            .unwrap()
            .into_inner()
            .resources[0],
    ));

    // As cert-manager's csi driver or a deploy script does: write aside, rename over.
    let (c2, k2) = home.client_cert("ca1", "w2").await;
    for (src, name) in [(&k2, "tls.key"), (&c2, "tls.crt")] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, rd(src)).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    let r = next(&mut s, &names, "tls.crt and tls.key renamed over").await;
    assert_eq!(r.name, "default");
    assert_ne!(leaf_serial(&r), before);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_symlink_swap_reaches_open_streams_without_polling() {
    let home = Home::new().await;
    let mount = home.tmp().join("mount");
    std::fs::create_dir_all(&mount).unwrap();
    let ca1 = home.root_pem("ca1").await;
    let (c1, k1) = home.client_cert("ca1", "w1").await;
    write_secret_dir(&mount, "gen1", &rd(&c1), &rd(&k1), &ca1);
    let (server, mut client) = start_unpolled(&home, files_source(&mount)).await;
    let names = ["default", "ROOTCA"];
    let mut s = open(&mut client, &names).await;

    // Kubernetes updates the Secret volume: a new ..data target, swapped by rename.
    let (c2, k2) = home.client_cert("ca1", "w2").await;
    let both = format!("{ca1}{}", home.root_pem("ca2").await);
    write_secret_dir(&mount, "gen2", &rd(&c2), &rd(&k2), &both);
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(next(&mut s, &names, "..data swapped").await);
    }
    got.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(got[0].name, "ROOTCA");
    assert_eq!(bundle_len(&got[0]), 2);
    assert_eq!(got[1].name, "default");
    server.shutdown().await.unwrap();
}
