//! The Replication stream against a real server on 127.0.0.1:0: from 0
//! (snapshot), from the middle, from a compacted revision, live, namespace
//! filtering, heartbeats, and a stalled subscriber that must not delay writes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use flagstream::pb;
use flagstream::pb::sync_message::Kind;
use tonic::Streaming;

/// The next message that is not a heartbeat.
async fn next(stream: &mut Streaming<pb::SyncMessage>) -> Kind {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("no message within 10 s")
            .expect("stream failed")
            .expect("stream ended");
        match message.kind.expect("empty message") {
            Kind::Heartbeat(_) => continue,
            kind => return kind,
        }
    }
}

/// Reads a whole snapshot; returns its revision and flag keys.
async fn snapshot(stream: &mut Streaming<pb::SyncMessage>) -> (u64, Vec<String>) {
    let Kind::SnapshotBegin(begin) = next(stream).await else {
        panic!("expected SnapshotBegin")
    };
    let mut flags = Vec::new();
    loop {
        match next(stream).await {
            Kind::SnapshotChunk(chunk) => flags.extend(
                chunk
                    .flags
                    .into_iter()
                    .map(|f| format!("{}/{}", f.namespace, f.key)),
            ),
            Kind::SnapshotEnd(end) => {
                assert_eq!(end.revision, begin.revision);
                return (end.revision, flags);
            }
            other => panic!("unexpected {other:?} inside a snapshot"),
        }
    }
}

/// Reads changes; returns their revisions and the number of deltas each had.
async fn changes(stream: &mut Streaming<pb::SyncMessage>, count: usize) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    for _ in 0..count {
        match next(stream).await {
            Kind::Change(change) => out.push((change.revision, change.deltas.len())),
            other => panic!("expected a Change, got {other:?}"),
        }
    }
    out
}

/// Subscribes from `from`, presenting the store's own history position there (as a replica
/// that applied `from` does), so that the stream resumes instead of sending a snapshot.
async fn subscribe(server: &Server, from: u64, namespaces: &[&str]) -> Streaming<pb::SyncMessage> {
    let chain = chain_at(server, from).await;
    subscribe_at(server, from, chain, namespaces).await
}

async fn subscribe_at(
    server: &Server,
    from: u64,
    chain: Vec<u8>,
    namespaces: &[&str],
) -> Streaming<pb::SyncMessage> {
    let mut sync = server.sync(Some(SYNC)).await;
    sync.subscribe(pb::SubscribeRequest {
        from_revision: from,
        namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        chain,
    })
    .await
    .unwrap()
    .into_inner()
}

/// The history position after revision `revision`, from ListHistory of the namespaces the tests
/// write to; empty when no such entry is retained.
async fn chain_at(server: &Server, revision: u64) -> Vec<u8> {
    let mut admin = server.admin(Some(ADMIN)).await;
    for namespace in ["prod", "dev"] {
        let Ok(history) = admin
            .list_history(pb::ListHistoryRequest {
                namespace: namespace.into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
        else {
            continue;
        };
        if let Some(entry) = history
            .into_inner()
            .entries
            .into_iter()
            .find(|e| e.revision == revision)
        {
            return entry.chain;
        }
    }
    Vec::new()
}

/// Creates namespace `prod` (revision 1) and `n` flags (revisions 2..=n+1).
async fn populate(server: &Server, n: usize) -> Admin {
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "prod").await;
    for i in 0..n {
        create_flag(&mut admin, flag("prod", &format!("f{i:03}"))).await;
    }
    admin
}

#[tokio::test]
async fn from_zero_snapshot_then_live() {
    let server = Server::start().await;
    let mut admin = populate(&server, 5).await;
    let mut stream = subscribe(&server, 0, &[]).await;
    let (revision, flags) = snapshot(&mut stream).await;
    assert_eq!(revision, 6);
    assert_eq!(flags.len(), 5);
    create_flag(&mut admin, flag("prod", "live")).await;
    assert_eq!(changes(&mut stream, 1).await, [(7, 1)]);
    server.stop().await;
}

#[tokio::test]
async fn from_the_middle_gets_the_rest_of_the_log() {
    let server = Server::start().await;
    let mut admin = populate(&server, 5).await;
    let mut stream = subscribe(&server, 3, &[]).await;
    assert_eq!(changes(&mut stream, 3).await, [(4, 1), (5, 1), (6, 1)]);
    admin
        .set_flag_enabled(pb::SetFlagEnabledRequest {
            namespace: "prod".into(),
            key: "f000".into(),
            enabled: false,
            ..Default::default()
        })
        .await
        .unwrap();
    let Kind::Change(change) = next(&mut stream).await else {
        panic!("expected a change")
    };
    assert_eq!(change.revision, 7);
    let Some(pb::delta::Kind::PutFlag(flag)) = &change.deltas[0].kind else {
        panic!("expected a put")
    };
    assert!(!flag.enabled);
    server.stop().await;
}

#[tokio::test]
async fn from_a_compacted_revision_gets_a_snapshot() {
    let server = Server::start_with(|c| c.changelog_retention = 4).await;
    let mut admin = populate(&server, 20).await;
    // The writer compacts between batches; one more write makes sure it ran.
    create_flag(&mut admin, flag("prod", "last")).await;
    let mut stream = subscribe(&server, 2, &[]).await;
    let (revision, flags) = snapshot(&mut stream).await;
    assert_eq!((revision, flags.len()), (22, 21));
    // History only lists what the log retains.
    let history = admin
        .list_history(pb::ListHistoryRequest {
            namespace: "prod".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        history.entries.len() < 10,
        "{} entries retained",
        history.entries.len()
    );
    // A replica right at the retained window still gets changes only.
    let oldest = history.entries.last().unwrap().revision;
    let mut stream = subscribe(&server, oldest, &[]).await;
    let got = changes(&mut stream, (22 - oldest) as usize).await;
    assert_eq!(got.first().unwrap().0, oldest + 1);
    server.stop().await;
}

#[tokio::test]
async fn other_namespaces_arrive_as_empty_changes() {
    let server = Server::start().await;
    let mut admin = populate(&server, 1).await;
    create_namespace(&mut admin, "dev").await;
    create_flag(&mut admin, flag("dev", "x")).await;
    let mut stream = subscribe(&server, 0, &["dev"]).await;
    let (revision, flags) = snapshot(&mut stream).await;
    assert_eq!((revision, flags), (4, vec!["dev/x".to_string()]));
    create_flag(&mut admin, flag("prod", "p")).await;
    create_flag(&mut admin, flag("dev", "d")).await;
    assert_eq!(changes(&mut stream, 2).await, [(5, 0), (6, 1)]);
    server.stop().await;
}

#[tokio::test]
async fn heartbeats_carry_the_head() {
    let server = Server::start().await;
    let _admin = populate(&server, 2).await;
    let mut stream = subscribe(&server, 3, &[]).await;
    let message = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(Kind::Heartbeat(beat)) = message.kind else {
        panic!("expected a heartbeat, got {message:?}")
    };
    assert_eq!(beat.head_revision, 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_delay_writes() {
    // A small in-memory feed, so the stalled subscriber must catch up from
    // the change log on disk.
    let server = Server::start_with(|c| c.feed_capacity = 64).await;
    let mut admin = populate(&server, 1).await;
    // Every change carries the whole flag: 64 KiB, so the stalled
    // subscriber's channel and HTTP/2 windows fill after a few dozen.
    let mut big = flag("prod", "f000");
    big.metadata = (0..64)
        .map(|i| (format!("k{i}"), "x".repeat(1000)))
        .collect();
    admin
        .update_flag(pb::UpdateFlagRequest {
            flag: Some(big),
            expected_revision: 0,
            options: None,
        })
        .await
        .unwrap();
    // This subscriber does not read until the writes are done.
    let mut stalled = subscribe(&server, 0, &[]).await;
    let mut live = subscribe(&server, 3, &[]).await;
    let n = 400u64;
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let mut admin = admin.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..n / 8 {
                admin
                    .set_flag_enabled(pb::SetFlagEnabledRequest {
                        namespace: "prod".into(),
                        key: "f000".into(),
                        enabled: (w + i) % 2 == 0,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    // The live subscriber keeps up while the stalled one is stuck.
    let got = changes(&mut live, n as usize).await;
    assert!(
        got.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "gap in the live stream"
    );
    for writer in writers {
        writer.await.unwrap();
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(20),
        "{n} writes took {elapsed:?}"
    );
    // The stalled subscriber then catches up, gap-free, from the log.
    let (revision, _) = snapshot(&mut stalled).await;
    let rest = changes(&mut stalled, (n + 3 - revision) as usize).await;
    let revisions: Vec<u64> = rest.iter().map(|c| c.0).collect();
    assert_eq!(revisions, ((revision + 1)..=n + 3).collect::<Vec<_>>());
    let head = admin
        .list_namespaces(pb::ListNamespacesRequest {})
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert_eq!(head, n + 3);
    server.stop().await;
}

#[tokio::test]
async fn large_snapshots_come_in_chunks_of_about_one_mib() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "prod").await;
    // 600 flags of about 4 KiB each: about 2.4 MiB in all.
    for i in 0..600 {
        let mut f = flag("prod", &format!("big{i:03}"));
        f.description = "x".repeat(4000);
        create_flag(&mut admin, f).await;
    }
    let mut stream = subscribe(&server, 0, &[]).await;
    let Kind::SnapshotBegin(begin) = next(&mut stream).await else {
        panic!("expected SnapshotBegin")
    };
    assert_eq!(begin.revision, 601);
    let mut sizes = Vec::new();
    let mut flags = 0;
    loop {
        match next(&mut stream).await {
            Kind::SnapshotChunk(chunk) => {
                sizes.push(prost::Message::encoded_len(&chunk));
                flags += chunk.flags.len();
            }
            Kind::SnapshotEnd(end) => {
                assert_eq!(end.revision, 601);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(flags, 600);
    assert!(sizes.len() >= 3, "chunk sizes {sizes:?}");
    assert!(
        sizes.iter().all(|s| *s <= 1024 * 1024 + 8 * 1024),
        "chunk sizes {sizes:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn metrics_endpoint_reports_writes_head_and_subscribers() {
    let port = common::process::free_port();
    let server = Server::start_with(|c| {
        c.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap())
    })
    .await;
    let mut admin = populate(&server, 2).await;
    let _ = admin
        .create_flag(pb::CreateFlagRequest {
            flag: Some(flag("prod", "f000")),
            options: None,
        })
        .await
        .unwrap_err();
    // A call without a token, and one with a token nobody has: refused and counted.
    let mut anonymous = server.admin(None).await;
    let mut stranger = server.admin(Some("nobody-has-this-token-0123")).await;
    for client in [&mut anonymous, &mut stranger] {
        let refused = client
            .list_namespaces(pb::ListNamespacesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }
    let mut stream = subscribe(&server, 3, &[]).await;
    let _ = stream.message().await;
    let body = scrape(port).await;
    for line in [
        "HTTP/1.1 200 OK",
        "flagwrite_writes_total{rpc=\"CreateFlag\",outcome=\"ok\"} 2",
        "flagwrite_writes_total{rpc=\"CreateFlag\",outcome=\"already_exists\"} 1",
        "flagwrite_head_revision 3",
        "flagwrite_subscribers 1",
        "flagwrite_write_duration_seconds_count 4",
        "flagstream_grpc_requests_total{service=\"flagstream.v1.FlagAdmin\",method=\"CreateFlag\",code=\"OK\"} 2",
        "flagstream_grpc_requests_total{service=\"flagstream.v1.FlagAdmin\",method=\"CreateFlag\",code=\"ALREADY_EXISTS\"} 1",
        "flagstream_grpc_requests_total{service=\"flagstream.v1.FlagAdmin\",method=\"ListNamespaces\",code=\"UNAUTHENTICATED\"} 2",
        "flagstream_auth_failures_total{reason=\"missing\"} 1",
        "flagstream_auth_failures_total{reason=\"unknown_token\"} 1",
    ] {
        assert!(
            body.lines().any(|l| l.trim_end() == line),
            "missing {line:?} in\n{body}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_behind_the_retained_window_gets_a_fresh_snapshot() {
    // Four changes in memory, eight in the log: a subscriber that stalls for
    // 200 changes of 64 KiB (more than the HTTP/2 windows and the channel
    // hold) finds its next revision gone from both.
    let server = Server::start_with(|c| {
        c.changelog_retention = 8;
        c.feed_capacity = 4;
    })
    .await;
    let mut admin = populate(&server, 1).await;
    let mut stream = subscribe(&server, 0, &[]).await;
    let (first, _) = snapshot(&mut stream).await;
    assert_eq!(first, 2);
    let mut f = flag("prod", "f000");
    f.metadata = (0..64)
        .map(|i| (format!("k{i}"), "x".repeat(1000)))
        .collect();
    for i in 0..200 {
        tokio::time::timeout(
            Duration::from_secs(10),
            admin.update_flag(pb::UpdateFlagRequest {
                flag: Some(f.clone()),
                expected_revision: 0,
                options: None,
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("write {i} hung"))
        .unwrap();
    }
    // Drain what was queued before the stall, then expect a fresh snapshot.
    let mut last = first;
    loop {
        match next(&mut stream).await {
            Kind::Change(change) => {
                assert_eq!(change.revision, last + 1, "gap before the fresh snapshot");
                assert!(
                    change.revision < 202,
                    "the subscriber never fell behind the window"
                );
                last = change.revision;
            }
            Kind::SnapshotBegin(begin) => {
                assert!(begin.revision > last + 1);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let revision = loop {
        match next(&mut stream).await {
            Kind::SnapshotChunk(_) => {}
            Kind::SnapshotEnd(end) => break end.revision,
            other => panic!("unexpected {other:?} in the snapshot"),
        }
    };
    // Then live changes continue from the snapshot's revision.
    if revision < 202 {
        let got = changes(&mut stream, (202 - revision) as usize).await;
        assert_eq!(got.first().unwrap().0, revision + 1);
    }
    admin
        .set_flag_enabled(pb::SetFlagEnabledRequest {
            namespace: "prod".into(),
            key: "f000".into(),
            enabled: false,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(changes(&mut stream, 1).await[0].0, 203);
    server.stop().await;
}

#[tokio::test]
async fn a_subscriber_resumes_only_into_the_same_history() {
    // Two stores with the same writes: the same revisions, different histories.
    let server = Server::start().await;
    populate(&server, 5).await;
    let other = Server::start().await;
    populate(&other, 5).await;
    let own = chain_at(&server, 3).await;
    let foreign = chain_at(&other, 3).await;
    assert_eq!(own.len(), 16);
    assert_ne!(own, foreign, "two stores never share a position");
    other.stop().await;

    // The store's own position resumes; another store's, a made-up one or none at all gets a
    // full snapshot, as a replica of a writer restored from a backup does.
    let mut stream = subscribe_at(&server, 3, own.clone(), &[]).await;
    assert_eq!(changes(&mut stream, 3).await, [(4, 1), (5, 1), (6, 1)]);
    for chain in [foreign, vec![0; 16], Vec::new()] {
        let mut stream = subscribe_at(&server, 3, chain.clone(), &[]).await;
        let (revision, flags) = snapshot(&mut stream).await;
        assert_eq!((revision, flags.len()), (6, 5), "position {chain:?}");
    }

    // A restart keeps the history: the same position still resumes.
    let dir = server.stop_keeping_data().await;
    let server = Server::start_in(dir, |_| {}).await;
    assert_eq!(chain_at(&server, 3).await, own);
    let mut stream = subscribe_at(&server, 3, own, &[]).await;
    assert_eq!(changes(&mut stream, 3).await, [(4, 1), (5, 1), (6, 1)]);
    server.stop().await;
}

#[tokio::test]
async fn snapshots_and_changes_carry_the_history_position() {
    let server = Server::start().await;
    let mut admin = populate(&server, 2).await;
    let mut stream = subscribe(&server, 0, &[]).await;
    let Kind::SnapshotBegin(begin) = next(&mut stream).await else {
        panic!("expected SnapshotBegin")
    };
    assert_eq!(begin.revision, 3);
    assert_eq!(begin.chain, chain_at(&server, 3).await);
    let digest = admin
        .get_state_digest(pb::GetStateDigestRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(begin.history_id, digest.history_id);
    assert_eq!(flagstream::digest::hex(&begin.chain), digest.chain);
    while !matches!(next(&mut stream).await, Kind::SnapshotEnd(_)) {}
    create_flag(&mut admin, flag("prod", "live")).await;
    let Kind::Change(change) = next(&mut stream).await else {
        panic!("expected a Change")
    };
    assert_eq!(change.revision, 4);
    assert_eq!(change.chain, chain_at(&server, 4).await);
    assert_ne!(change.chain, begin.chain);
    server.stop().await;
}

/// The whole answer (head and body) of flagwrite's `/metrics` at `port`.
async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    socket.read_to_string(&mut body).await.unwrap();
    body
}

/// The value of metric `name` (no labels) on flagwrite's `/metrics` at `port`.
async fn metric(port: u16, name: &str) -> u64 {
    let body = scrape(port).await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{body}"))
}

#[tokio::test]
async fn subscribers_asking_together_share_one_snapshot_then_follow_on_their_own() {
    let port = common::process::free_port();
    let server = Server::start_with(|c| {
        c.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap())
    })
    .await;
    let mut admin = populate(&server, 40).await;
    create_namespace(&mut admin, "dev").await;
    create_flag(&mut admin, flag("dev", "d1")).await;
    // A rolling restart: eight replicas ask for everything, two for `dev` only.
    let mut all = Vec::new();
    for _ in 0..8 {
        all.push(subscribe(&server, 0, &[]).await);
    }
    let mut dev = vec![
        subscribe(&server, 0, &["dev"]).await,
        subscribe(&server, 0, &["dev"]).await,
    ];
    for stream in &mut all {
        let (revision, flags) = snapshot(stream).await;
        assert_eq!((revision, flags.len()), (43, 41));
    }
    for stream in &mut dev {
        assert_eq!(snapshot(stream).await, (43, vec!["dev/d1".to_string()]));
    }
    assert_eq!(
        metric(port, "flagwrite_snapshots_built_total").await,
        2,
        "one snapshot per namespace selection, not one per subscriber"
    );
    // Each continues from the change log on its own; a latecomer still shares the snapshot and
    // catches up on what was written since.
    create_flag(&mut admin, flag("prod", "late")).await;
    for stream in &mut all {
        assert_eq!(changes(stream, 1).await, vec![(44, 1)]);
    }
    for stream in &mut dev {
        assert_eq!(changes(stream, 1).await, vec![(44, 0)]);
    }
    let mut latecomer = subscribe(&server, 0, &[]).await;
    assert_eq!(snapshot(&mut latecomer).await.0, 43, "the shared snapshot");
    assert_eq!(changes(&mut latecomer, 1).await, vec![(44, 1)]);
    assert_eq!(metric(port, "flagwrite_snapshots_built_total").await, 2);
    server.stop().await;
}

#[tokio::test]
async fn subscribers_beyond_the_limit_are_refused() {
    let server = Server::start_with(|c| c.max_subscribers = 2).await;
    populate(&server, 1).await;
    let mut first = subscribe(&server, 0, &[]).await;
    let _second = subscribe(&server, 0, &[]).await;
    snapshot(&mut first).await;
    let mut sync = server.sync(Some(SYNC)).await;
    let refused = sync
        .subscribe(pb::SubscribeRequest::default())
        .await
        .expect_err("a third subscriber");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains("limit"), "{refused:?}");
    drop(first);
    // The slot is freed once the server notices the stream is gone.
    let started = Instant::now();
    loop {
        match sync.subscribe(pb::SubscribeRequest::default()).await {
            Ok(_) => break,
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(started.elapsed() < Duration::from_secs(10), "never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    server.stop().await;
}
