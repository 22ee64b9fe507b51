//! The ends of a connection's and of the server's life: a replica that vanishes without closing
//! its connection is found by HTTP/2 keepalive and its subscription ends, and a shutdown with a
//! call that never finishes still ends within one grace period.

mod common;

use std::time::{Duration, Instant};

use common::*;
use flagstream::pb;
use flagstream::pb::replication_client::ReplicationClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy for one connection at a time that can be frozen: once frozen it forwards nothing
/// either way and closes nothing, as a replica whose host vanished would look to the writer.
struct FreezableProxy {
    addr: std::net::SocketAddr,
    frozen: watch::Sender<bool>,
}

impl FreezableProxy {
    /// Forwards connections on a fresh loopback port to `upstream`. The accept task and the
    /// pumps end with the test's runtime.
    async fn start(upstream: std::net::SocketAddr) -> FreezableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, watching) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, watching.clone()));
                tokio::spawn(pump(server_read, client_write, watching.clone()));
            }
        });
        FreezableProxy { addr, frozen }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

/// Copies `from` to `to` until either ends; once frozen it stops reading and writing for good,
/// holding both sockets open.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = frozen.wait_for(|f| *f) => break,
        };
        if *frozen.borrow() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if *frozen.borrow() {
        let _keep = (from, to);
        std::future::pending::<()>().await;
    }
}

/// One metric's value from the `/metrics` endpoint on `port`.
async fn metric(port: u16, name: &str) -> i64 {
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    socket.read_to_string(&mut body).await.unwrap();
    let prefix = format!("{name} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{name} missing in\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_vanishes_is_dropped_after_keepalive_interval_and_timeout() {
    let port = process::free_port();
    let server = Server::start_with(|c| {
        c.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
        c.keepalive_s = 1;
        c.keepalive_timeout_s = 1;
    })
    .await;
    let mut admin = server.admin(Some(ADMIN)).await;
    admin
        .create_namespace(pb::CreateNamespaceRequest {
            namespace: Some(namespace("prod")),
            options: None,
        })
        .await
        .unwrap();

    let proxy = FreezableProxy::start(server.addr).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ReplicationClient::with_interceptor(channel, Bearer(Some(SYNC)));
    let mut stream = client
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    // The snapshot arrives, so the subscription is live.
    stream.message().await.unwrap().unwrap();
    assert_eq!(metric(port, "flagwrite_subscribers").await, 1);

    // The replica's host vanishes: no FIN, no RST, no answer to pings. Keepalive (1 s interval,
    // 1 s timeout) closes the connection, and the subscription ends with it.
    proxy.freeze();
    let frozen = Instant::now();
    loop {
        if metric(port, "flagwrite_subscribers").await == 0 {
            break;
        }
        assert!(
            frozen.elapsed() < Duration::from_secs(6),
            "the vanished subscriber is still registered after {:?}",
            frozen.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(stream);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_one_grace_period_with_a_call_that_never_finishes() {
    let grace = Duration::from_secs(2);
    let server = Server::start_with(|c| c.shutdown_grace_secs = grace.as_secs()).await;
    // Make sure the server is up before the raw connection.
    drop(server.channel().await);

    // A unary call whose request never ends: the handler waits for its message for ever, and
    // the connection (holding the services and the writer's handle) with it.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut h2, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping_pong = connection.ping_pong().expect("taken once");
    // Ends when the server closes the connection.
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/flagstream.v1.FlagAdmin/ListNamespaces",
            server.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {ADMIN}"))
        .body(())
        .unwrap();
    let (response, _request_body) = h2.send_request(request, false).unwrap();
    // The server answers a ping only after reading the frames before it, so once the pong is
    // back the call is the server's, and it answers nothing: it waits for the request's message.
    ping_pong.ping(h2::Ping::opaque()).await.unwrap();
    let response = tokio::spawn(response);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!response.is_finished(), "the server answered");

    let started = Instant::now();
    server.stop().await;
    let took = started.elapsed();
    assert!(
        took < grace + Duration::from_millis(1500),
        "shutdown took {took:?}, more than the grace period of {grace:?}"
    );
    assert!(
        took >= grace - Duration::from_millis(200),
        "the call was not waited for: {took:?}"
    );
}
