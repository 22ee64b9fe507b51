//! The replica's metrics and the end of its life, served by `flagread::run_with` on 127.0.0.1:0
//! following a fake upstream: per-flag series stay bounded unless a namespace opts in, every
//! call is counted by status code, refused tokens are counted, and a drain with a call that
//! never finishes still ends within `--drain-s`.

mod support;

use std::time::{Duration, Instant};

use flagread::{Config, Handles};
use flagstream::pb;
use flagstream::pb::flag_eval_client::FlagEvalClient;
use support::*;
use tonic::Code;

/// A replica running in this process, holding whatever its first subscription was sent.
struct Replica {
    addr: std::net::SocketAddr,
    handles: Handles,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), flagread::Error>>,
    /// The fake writer and the subscription the replica follows, kept up while it runs.
    _upstream: (FakeUpstream, Subscription),
}

impl Replica {
    /// Starts a replica of a fresh fake upstream (after `adjust` changed its configuration),
    /// sends it `snapshot` and waits until it holds it.
    async fn start(adjust: impl FnOnce(&mut Config), snapshot: Vec<pb::SyncMessage>) -> Replica {
        let mut fake = FakeUpstream::start().await;
        let mut config = Config::local(fake.url.clone());
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (handles_tx, handles_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(flagread::run_with(
            listener,
            config,
            async {
                let _ = stopped.await;
            },
            move |handles| {
                let _ = handles_tx.send(handles);
            },
        ));
        let handles = handles_rx.await.expect("the replica starts");
        let subscription = fake.next().await;
        subscription.send(snapshot).await;
        let state = handles.state.clone();
        eventually("the snapshot is applied", || state.is_ready()).await;
        Replica {
            addr,
            handles,
            stop,
            task,
            _upstream: (fake, subscription),
        }
    }

    async fn client(&self) -> FlagEvalClient<tonic::transport::Channel> {
        FlagEvalClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
    }

    async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut socket = tokio::net::TcpStream::connect(self.handles.metrics_listen)
            .await
            .unwrap();
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        socket.read_to_string(&mut text).await.unwrap();
        text
    }
}

/// The value of the series `line_start` (name and labels) in `metrics`.
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// 30,000 flags in namespace `big` (and one in `prod`), each evaluated once by EvaluateAll.
async fn evaluate_30000(adjust: impl FnOnce(&mut Config)) -> (Replica, String) {
    let mut flags: Vec<_> = (0..30_000)
        .map(|i| flag("big", &format!("flag-{i:05}"), 3))
        .collect();
    flags.push(flag("prod", "a", 3));
    let replica = Replica::start(adjust, snapshot(3, flags)).await;
    let mut client = replica.client().await;
    let all = client
        .evaluate_all(pb::EvaluateAllRequest {
            namespace: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.results.len(), 30_000);
    let metrics = replica.scrape().await;
    (replica, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_flag_series_are_bounded_unless_a_namespace_opts_in() {
    // By default every namespace is one series per reason: a small scrape, whatever the flags.
    let (replica, metrics) = evaluate_30000(|_| {}).await;
    assert!(
        metrics.len() < 16 * 1024,
        "a scrape of {} bytes:\n{}",
        metrics.len(),
        &metrics[..metrics.len().min(4096)]
    );
    assert_eq!(
        value(
            &metrics,
            "flagread_evaluations_total{namespace=\"big\",reason=\"STATIC\"}"
        ),
        Some(30_000.0),
        "{metrics}"
    );
    assert!(!metrics.contains("flagread_flag_evaluations_total{"));
    assert_eq!(value(&metrics, "flagread_flag_series_dropped"), Some(0.0));
    // Sub-microsecond or not, the evaluation time adds up.
    let sum = value(&metrics, "flagread_evaluation_seconds_sum").unwrap();
    assert!(sum > 0.0, "{metrics}");
    let _ = replica.stop.send(());

    // Opted in, per-flag series are exported up to the cap; the rest are counted as dropped
    // and are still in the namespace total.
    let (replica, metrics) = evaluate_30000(|c| {
        c.flag_metrics_namespaces = vec!["big".into()];
        c.flag_metrics_max_series = 1000;
    })
    .await;
    let per_flag = metrics
        .lines()
        .filter(|l| l.starts_with("flagread_flag_evaluations_total{"))
        .count();
    assert_eq!(per_flag, 1000);
    assert!(metrics.contains(
        "flagread_flag_evaluations_total{namespace=\"big\",flag=\"flag-00000\",variant=\"on\",reason=\"STATIC\"} 1\n"
    ));
    assert_eq!(
        value(&metrics, "flagread_flag_series_dropped"),
        Some(29_000.0)
    );
    assert_eq!(
        value(
            &metrics,
            "flagread_evaluations_total{namespace=\"big\",reason=\"STATIC\"}"
        ),
        Some(30_000.0)
    );
    let _ = replica.stop.send(());
}

#[tokio::test]
async fn calls_are_counted_by_status_code_and_refused_tokens_are_counted() {
    let dir = std::env::temp_dir().join(format!(
        "flagread-metrics-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "web eval web-secret-0123456789\n").unwrap();
    let replica = Replica::start(
        |c| {
            c.dev_no_auth = false;
            c.tokens_file = Some(tokens);
        },
        snapshot(3, vec![flag("prod", "a", 3)]),
    )
    .await;
    let mut client = replica.client().await;
    let call = |token: Option<&str>, flag: &str| {
        let mut request = tonic::Request::new(pb::EvaluateRequest {
            namespace: "prod".into(),
            flag_key: flag.into(),
            ..Default::default()
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    };
    let code = |result: Result<tonic::Response<pb::EvaluateResponse>, tonic::Status>| {
        result.map_or_else(|s| s.code(), |_| Code::Ok)
    };
    let web = Some("web-secret-0123456789");
    assert_eq!(code(client.evaluate(call(web, "a")).await), Code::Ok);
    assert_eq!(
        code(client.evaluate(call(web, "nope")).await),
        Code::NotFound
    );
    assert_eq!(
        code(client.evaluate(call(web, "nope")).await),
        Code::NotFound
    );
    assert_eq!(
        code(client.evaluate(call(None, "a")).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            client
                .evaluate(call(Some("not-a-token-0123456789"), "a"))
                .await
        ),
        Code::Unauthenticated
    );

    let metrics = replica.scrape().await;
    for (series, want) in [
        (
            "flagstream_grpc_requests_total{service=\"flagstream.v1.FlagEval\",method=\"Evaluate\",code=\"OK\"}",
            1.0,
        ),
        (
            "flagstream_grpc_requests_total{service=\"flagstream.v1.FlagEval\",method=\"Evaluate\",code=\"NOT_FOUND\"}",
            2.0,
        ),
        (
            "flagstream_grpc_requests_total{service=\"flagstream.v1.FlagEval\",method=\"Evaluate\",code=\"UNAUTHENTICATED\"}",
            2.0,
        ),
        ("flagstream_auth_failures_total{reason=\"missing\"}", 1.0),
        (
            "flagstream_auth_failures_total{reason=\"unknown_token\"}",
            1.0,
        ),
    ] {
        assert_eq!(
            value(&metrics, series),
            Some(want),
            "{series} in\n{metrics}"
        );
    }
    let _ = replica.stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_ends_within_drain_s_with_a_call_that_never_finishes() {
    let drain = Duration::from_secs(2);
    let replica = Replica::start(
        |c| c.drain_s = drain.as_secs(),
        snapshot(3, vec![flag("prod", "a", 3)]),
    )
    .await;
    // A unary call whose request never ends: the handler waits for its message for ever.
    let tcp = tokio::net::TcpStream::connect(replica.addr).await.unwrap();
    let (mut h2, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping_pong = connection.ping_pong().expect("taken once");
    // Ends when the replica closes the connection.
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/flagstream.v1.FlagEval/Evaluate",
            replica.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, _request_body) = h2.send_request(request, false).unwrap();
    // The pong comes back after the server read the call's headers.
    ping_pong.ping(h2::Ping::opaque()).await.unwrap();
    let response = tokio::spawn(response);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!response.is_finished(), "the replica answered");

    let started = Instant::now();
    let _ = replica.stop.send(());
    tokio::time::timeout(drain * 3, replica.task)
        .await
        .expect("the replica stops")
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(
        took < drain + Duration::from_millis(1500),
        "the drain took {took:?}, more than --drain-s {drain:?}"
    );
    assert!(
        took >= drain - Duration::from_millis(200),
        "the call was not waited for: {took:?}"
    );
}
