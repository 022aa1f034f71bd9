//! A client that stops reading cannot grow the server's memory: a stream gets no newer
//! version of a secret until it has answered (ACK or NACK) the last one, so its streams are
//! simply not served until it reads again, and then get the current version, not every
//! version they missed.
//!
//! This binary holds one test on purpose: it reads its own process's RSS (server and clients
//! run in it), so no other test may run beside it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use meshca_sds::metrics::Mode;
use meshca_sds::{Server, DEFAULT_NAME};

/// Streams that never read.
const CONNS: usize = 20;
const STREAMS_PER_CONN: usize = 10;
/// Renewals pushed while they do not read.
const WARMUP: usize = 20;
const ROUNDS: usize = 100;

fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb / 1024.0
}

fn current_version(server: &Server) -> String {
    let snaps = server.snapshots();
    let v = snaps
        .borrow()
        .get(DEFAULT_NAME)
        .expect("default is served")
        .version
        .clone();
    v
}

/// Forces a renewal and waits until it is published.
async fn renew(server: &Server) {
    let before = current_version(server);
    server.reload();
    let mut snaps = server.snapshots();
    tokio::time::timeout(
        Duration::from_secs(10),
        snaps.wait_for(|s| s.get(DEFAULT_NAME).map(|e| e.version.as_str()) != Some(&before)),
    )
    .await
    .expect("renewal published within 10 s")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_grow_the_server() {
    let home = Home::new().await;
    let (server, sock) = start(&home, local_source(&home, None)).await;

    // Streams that subscribe and then never read a byte.
    let mut stalled = Vec::new();
    for _ in 0..CONNS {
        // hyper's default windows (2 MiB a stream, 5 MiB a connection): flow control
        // alone would let the server queue hundreds of responses for each stream.
        let mut c = Client::new(unix_channel(&sock).await);
        for _ in 0..STREAMS_PER_CONN {
            stalled.push(Sotw::open(&mut c, &["default"]).await);
        }
    }
    // A client that reads (and ACKs) everything: proves the renewals were pushed.
    let mut reader = Sotw::open(&mut Client::new(unix_channel(&sock).await), &["default"]).await;
    let last_seen = Arc::new(std::sync::Mutex::new(String::new()));
    let seen = last_seen.clone();
    let reading = tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok(Ok(Some(r))) =
            tokio::time::timeout(Duration::from_secs(30), reader.rx.message()).await
        {
            reader
                .send(req(&["default"], &r.nonce, &r.version_info, None))
                .await;
            *seen.lock().unwrap() = r.version_info.clone();
            n += 1;
        }
        n
    });

    for _ in 0..WARMUP {
        renew(&server).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = rss_mib();
    let pushes0 = server.metrics().pushes.get(Mode::Sotw);

    for _ in 0..ROUNDS {
        renew(&server).await;
    }
    // The reader gets the last renewal, so they were fanned out.
    let want = current_version(&server);
    assert!(
        eventually(10, || *last_seen.lock().unwrap() == want).await,
        "the reading client never got the last version {want}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = rss_mib();
    let pushes1 = server.metrics().pushes.get(Mode::Sotw);

    // Had the server queued each version for each stalled stream, it would hold
    // ROUNDS x streams x a secret of over 1 KiB: 100 x 200 x 1 KiB = 19.5 MiB at the least.
    let streams = CONNS * STREAMS_PER_CONN;
    let pushed = pushes1 - pushes0;
    println!(
        "{streams} stalled streams, {ROUNDS} renewals: {pushed} pushes handed to HTTP/2 \
         (the reading client's included); RSS {rss0:.1} -> {rss1:.1} MiB"
    );
    assert!(
        pushed <= (ROUNDS + streams) as u64,
        "{pushed} pushes for {ROUNDS} renewals: stalled streams were still being served"
    );
    assert!(
        rss1 - rss0 < 8.0,
        "RSS grew from {rss0:.1} to {rss1:.1} MiB while {streams} clients did not read"
    );

    // A stalled client that reads again gets what its windows held, then the current
    // version, not the 120 it missed. Its streams share one connection window, so all of
    // them read again (as a client that resumes does).
    let mut resumed = Vec::new();
    for mut s in stalled.drain(..STREAMS_PER_CONN) {
        resumed.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Ok(Ok(Some(r))) =
                tokio::time::timeout(Duration::from_secs(3), s.rx.message()).await
            {
                s.send(req(&["default"], &r.nonce, &r.version_info, None))
                    .await;
                got.push(r.version_info);
            }
            got
        }));
    }
    for r in resumed {
        let got = r.await.unwrap();
        assert_eq!(
            got.last(),
            Some(&want),
            "the resumed stream ends on the current version"
        );
        assert!(
            got.len() < 20,
            "a resumed stream got {} responses: it was sent versions it had missed",
            got.len()
        );
    }

    drop(stalled);
    server.shutdown().await.unwrap();
    let n = reading.await.unwrap();
    // Renewals that arrive faster than it ACKs are coalesced: it gets the newest.
    assert!(n > WARMUP / 2, "the reader got only {n} responses");
}
