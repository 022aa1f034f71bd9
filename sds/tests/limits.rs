//! Per-connection and per-request limits: streams per connection, request size, names per
//! request, name length, and unknown names waiting on a stream. Each limit ends only the
//! offending stream, with a clear gRPC status; the server keeps serving.

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use meshca_sds::{Listen, ServeConfig, Server};
use tonic::Code;

async fn server(home: &Home, tweak: impl FnOnce(&mut ServeConfig)) -> (Server, PathBuf) {
    let sock = home.tmp().join("limits.sock");
    let mut cfg = ServeConfig::new(local_source(home, None), vec![Listen::Unix(sock.clone())]);
    cfg.shutdown_grace = Duration::from_secs(3);
    tweak(&mut cfg);
    (Server::start(cfg).await.unwrap(), sock)
}

/// The status that ends a SotW stream opened with `first`.
async fn sotw_status(
    client: &mut Client,
    first: envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest,
) -> tonic::Status {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.unwrap();
    let call = client.stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx));
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let mut rs = call.await?.into_inner();
        loop {
            if rs.message().await?.is_none() {
                return Err::<(), _>(tonic::Status::ok("stream ended without a status"));
            }
        }
    })
    .await
    .expect("the stream must end with an error status");
    drop(tx);
    r.unwrap_err()
}

async fn delta_status(
    client: &mut Client,
    first: envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest,
) -> tonic::Status {
    let mut d = Delta::open(client, first).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match d.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return tonic::Status::ok("stream ended without a status"),
                Err(s) => return s,
            }
        }
    })
    .await
    .expect("the stream must end with an error status")
}

fn names(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_per_request_and_name_length_are_limited() {
    let home = Home::new().await;
    let (server, sock) = server(&home, |_| {}).await;
    let mut client = Client::new(unix_channel(&sock).await);
    let many = names(129, "n");
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let s = sotw_status(&mut client, req(&many, "", "", None)).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message()
            .contains("129 resource names in one request; at most 128"),
        "{s:?}"
    );
    let s = delta_status(&mut client, dreq(&many, &[], "", None)).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = client
        .fetch_secrets(req(&many, "", "", None))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // A long name, with a terminal escape in it: refused, quoted escaped and cut short.
    let long = format!("\u{1b}[31m{}", "x".repeat(600));
    let s = sotw_status(&mut client, req(&["default", &long], "", "", None)).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("at most 512"), "{s:?}");
    assert!(
        !s.message().contains('\u{1b}') && s.message().contains("\\u{1b}"),
        "{s:?}"
    );
    assert!(s.message().len() < 200, "{s:?}");

    // 128 names is fine (the known one is served).
    let ok = names(127, "w");
    let mut ok: Vec<&str> = ok.iter().map(String::as_str).collect();
    ok.push("default");
    let server_limit = meshca_sds::Limits {
        max_unknown_per_stream: 200,
        ..Default::default()
    };
    drop(client);
    server.shutdown().await.unwrap();
    let (server, sock) = server_with_limits(&home, server_limit).await;
    let mut client = Client::new(unix_channel(&sock).await);
    let mut s = Sotw::open(&mut client, &ok).await;
    one_secret(&s.recv().await, "default");
    server.shutdown().await.unwrap();
}

async fn server_with_limits(home: &Home, limits: meshca_sds::Limits) -> (Server, PathBuf) {
    server(home, |c| c.limits = limits).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_get_a_bounded_answer() {
    let home = Home::new().await;
    let (server, sock) = server(&home, |_| {}).await;
    let mut client = Client::new(unix_channel(&sock).await);
    // 16 names that do not exist may wait, next to one that does.
    let wait = names(16, "later-");
    let mut wait: Vec<&str> = wait.iter().map(String::as_str).collect();
    wait.push("default");
    let mut s = Sotw::open(&mut client, &wait).await;
    one_secret(&s.recv().await, "default");
    s.quiet(Duration::from_millis(300)).await;
    // The 17th ends that stream with NOT_FOUND.
    let too_many = names(17, "nope-");
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let st = sotw_status(&mut client, req(&too_many, "", "", None)).await;
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    assert!(
        st.message().contains("17 subscribed secrets do not exist"),
        "{st:?}"
    );
    // Delta: subscriptions add up across requests.
    let first = names(10, "a-");
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let mut d = Delta::open(&mut client, dreq(&first, &[], "", None)).await;
    d.quiet(Duration::from_millis(300)).await;
    let second = names(10, "b-");
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    d.send(dreq(&second, &[], "", None)).await;
    let st = tokio::time::timeout(Duration::from_secs(5), d.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    // The waiting stream is unaffected and the server still serves.
    s.quiet(Duration::from_millis(200)).await;
    let mut ok = Sotw::open(&mut client, &["default"]).await;
    one_secret(&ok.recv().await, "default");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_is_resource_exhausted() {
    let home = Home::new().await;
    let (server, sock) = server(&home, |_| {}).await;
    let mut client = Client::new(unix_channel(&sock).await);
    let mut big = req(&["default"], "", "", None);
    big.node.as_mut().unwrap().user_agent_name = "x".repeat(300 * 1024);
    let st = sotw_status(&mut client, big).await;
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    // Just under the limit is fine.
    let mut fits = req(&["default"], "", "", None);
    fits.node.as_mut().unwrap().user_agent_name = "x".repeat(200 * 1024);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(fits).await.unwrap();
    let mut rs = client
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(Duration::from_secs(5), rs.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    one_secret(&r, "default");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_limited() {
    let home = Home::new().await;
    let (server, sock) = server(&home, |c| c.max_concurrent_streams = 2).await;
    let ch = unix_channel(&sock).await;
    let mut c1 = Client::new(ch.clone());
    let mut a = Sotw::open(&mut c1, &["default"]).await;
    one_secret(&a.recv().await, "default");
    let mut b = Sotw::open(&mut c1, &["default"]).await;
    one_secret(&b.recv().await, "default");
    // A third stream on the same connection waits for a free slot (HTTP/2
    // SETTINGS_MAX_CONCURRENT_STREAMS): the server never sees it.
    let mut c3 = Client::new(ch.clone());
    let third = tokio::spawn(async move {
        let mut s = Sotw::open(&mut c3, &["default"]).await;
        one_secret(&s.recv().await, "default");
        s
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!third.is_finished(), "third stream served beyond the limit");
    assert_eq!(server.metrics().streams_open.load(Ordering::Relaxed), 2);
    // Another connection is not affected.
    let mut other = Client::new(unix_channel(&sock).await);
    let mut o = Sotw::open(&mut other, &["default"]).await;
    one_secret(&o.recv().await, "default");
    // A slot frees up: the third stream goes through.
    drop(a);
    let _third = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("third stream served once a slot was free")
        .unwrap();
    drop(b);
    server.shutdown().await.unwrap();
}
