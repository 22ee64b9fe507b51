//! Replica chaining: a leaf follows a replica that serves the Replication stream
//! (`--serve-replication`), which follows a fake writer. Revisions, history positions and
//! identity pass through unchanged (a leaf resumes from its parent without a snapshot); the
//! writer's head and staleness reach the leaf; `min_revision` works on a leaf; a parent whose
//! writer is gone keeps serving its followers, which see the staleness; a new history reaches
//! every follower as a snapshot; followers are authenticated, bounded and limited to the
//! namespaces the parent holds.

mod support;

use std::time::Duration;

use flagread::Config;
use flagstream::pb;
use flagstream::pb::replication_client::ReplicationClient;
use flagstream::pb::sync_message::Kind;
use support::*;
use tonic::Code;
use tonic::transport::Channel;

const TOKENS: &str = "\
leaf   sync  leaf-sync-secret-0123456789
web    eval  web-eval-secret-0123456789
";

/// A replica serving replication, following `upstream`, with `adjust` applied.
fn parent_config(upstream: &str, adjust: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config::local(upstream);
    config.serve_replication = true;
    adjust(&mut config);
    config
}

fn evaluate(ns: &str, key: &str) -> pb::EvaluateRequest {
    pb::EvaluateRequest {
        namespace: ns.into(),
        flag_key: key.into(),
        ..Default::default()
    }
}

/// The variant `replica` serves for `ns/key`, and the revision it answered at.
async fn variant(replica: &Replica, ns: &str, key: &str) -> Result<(String, u64), tonic::Status> {
    let response = replica.client().await.evaluate(evaluate(ns, key)).await?;
    let response = response.into_inner();
    Ok((response.variant, response.revision))
}

/// A Replication client of `url`, presenting `token` if given.
async fn replication(url: &str) -> ReplicationClient<Channel> {
    ReplicationClient::connect(url.to_string()).await.unwrap()
}

async fn subscribe_with(
    url: &str,
    token: Option<&str>,
    request: pb::SubscribeRequest,
) -> Result<tonic::Streaming<pb::SyncMessage>, tonic::Status> {
    let mut request = tonic::Request::new(request);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    replication(url)
        .await
        .subscribe(request)
        .await
        .map(|r| r.into_inner())
}

/// The snapshot a writer restored from a backup sends: revision 4 of history `history_id`, at
/// a position of the restored history (not the fake's linear one), holding `prod/a`.
fn restored(history_id: &str) -> Vec<pb::SyncMessage> {
    vec![
        message(Kind::SnapshotBegin(pb::SnapshotBegin {
            revision: 4,
            history_id: history_id.into(),
            chain: vec![4; 16],
            namespaces: vec![],
        })),
        message(Kind::SnapshotChunk(pb::SnapshotChunk {
            namespaces: vec![namespace("prod")],
            flags: vec![flag("prod", "a", 3).into()],
            segments: vec![],
        })),
        message(Kind::SnapshotEnd(pb::SnapshotEnd { revision: 4 })),
    ]
}

/// The next message of `stream` that is not a heartbeat, within 10 s.
async fn next(stream: &mut tonic::Streaming<pb::SyncMessage>) -> Kind {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("a message other than a heartbeat within 10 s")
            .expect("the stream works")
            .expect("the stream goes on");
        match message.kind.expect("a message kind") {
            Kind::Heartbeat(_) => continue,
            kind => return kind,
        }
    }
}

#[tokio::test]
async fn a_leaf_follows_the_writer_through_a_replica_with_the_writers_revisions_and_history() {
    let mut writer = FakeUpstream::start().await;
    let parent = Replica::start(parent_config(&writer.url, |_| {})).await;
    let to_parent = writer.next().await;
    to_parent
        .send(snapshot(5, vec![flag("prod", "a", 3), flag("dev", "b", 5)]))
        .await;
    let leaf = Replica::start(Config::local(parent.url.clone())).await;
    eventually("the leaf holds the snapshot", || {
        leaf.handles.state.revision() == 5
    })
    .await;
    assert_eq!(variant(&leaf, "prod", "a").await.unwrap(), ("on".into(), 5));
    assert_eq!(variant(&leaf, "dev", "b").await.unwrap().0, "on");
    assert_eq!(
        leaf.handles.state.load().history,
        parent.handles.state.load().history,
        "the writer's history identity and position, unchanged"
    );
    assert_eq!(leaf.handles.state.load().history.id, HISTORY);

    // Changes pass through with their revisions and positions.
    to_parent
        .send([put(6, vec![flag("prod", "c", 6)]), delete(7, "prod", "a")])
        .await;
    eventually("both changes on the leaf", || {
        leaf.handles.state.revision() == 7
    })
    .await;
    assert_eq!(leaf.handles.state.load().history.chain, chain(7));
    assert_eq!(
        variant(&leaf, "prod", "a").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(variant(&leaf, "prod", "c").await.unwrap(), ("on".into(), 7));
    assert_eq!(leaf.handles.status.snapshots(), 1);

    // The parent's follower sees health SERVING for Replication once it holds a state.
    assert_eq!(
        parent.health_of("flagstream.v1.Replication").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    leaf.stop().await;
    parent.stop().await;
}

#[tokio::test]
async fn a_leaf_resumes_from_its_parent_without_a_snapshot_and_can_move_to_the_writer() {
    let mut writer = FakeUpstream::start().await;
    let parent = Replica::start(parent_config(&writer.url, |_| {})).await;
    let to_parent = writer.next().await;
    to_parent
        .send(snapshot(5, vec![flag("prod", "a", 3)]))
        .await;
    to_parent.send([put(6, vec![flag("prod", "b", 6)])]).await;

    // A leaf that held revision 6 (its snapshot file) resumes from the parent's retained
    // changes: the positions it holds are the parent's.
    let dir = temp_dir("chain-resume");
    let file = dir.join("state.snapshot");
    let mut config = Config::local(parent.url.clone());
    config.snapshot_file = Some(file.clone());
    config.snapshot_interval_ms = 1;
    let leaf = Replica::start(config.clone()).await;
    eventually("the leaf at 6", || leaf.handles.state.revision() == 6).await;
    leaf.stop().await;
    assert!(file.exists());
    to_parent.send([put(7, vec![flag("prod", "c", 7)])]).await;
    let leaf = Replica::start(config).await;
    eventually("the leaf resumed to 7", || {
        leaf.handles.state.revision() == 7
    })
    .await;
    assert_eq!(
        leaf.handles.status.snapshots(),
        0,
        "resumed after its file's revision, no snapshot"
    );
    leaf.stop().await;

    // The same file resumes against the writer itself: one history, wherever it is read.
    let mut config = Config::local(writer.url.clone());
    config.snapshot_file = Some(file);
    let leaf = Replica::start(config).await;
    let to_leaf = writer.next().await;
    assert_eq!(to_leaf.request.from_revision, 7);
    assert_eq!(to_leaf.request.chain, chain(7));
    leaf.stop().await;
    parent.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_leaf_knows_the_writers_head_and_waits_for_a_min_revision() {
    let mut writer = FakeUpstream::start().await;
    // Timer heartbeats far apart: only the relayed writer heartbeats can be seen in time.
    let parent = Replica::start(parent_config(&writer.url, |c| {
        c.replication_heartbeat_ms = 600_000
    }))
    .await;
    let to_parent = writer.next().await;
    to_parent
        .send(snapshot(5, vec![flag("prod", "a", 3)]))
        .await;
    let leaf = Replica::start(Config::local(parent.url.clone())).await;
    eventually("the leaf at 5", || leaf.handles.state.revision() == 5).await;

    // The writer's heartbeat names a head the parent has not applied: the leaf hears it.
    to_parent.send([heartbeat(9)]).await;
    eventually("the writer's head on the leaf", || {
        leaf.handles.status.head() == 9
    })
    .await;

    // A read-your-writes call on the leaf waits for the revision to arrive through the parent.
    let mut client = leaf.client().await;
    let pending = tokio::spawn(async move {
        let mut request = tonic::Request::new(pb::EvaluateRequest {
            min_revision: 6,
            ..evaluate("prod", "new")
        });
        request.set_timeout(Duration::from_secs(5));
        client.evaluate(request).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished(), "the call waits for revision 6");
    to_parent.send([put(6, vec![flag("prod", "new", 6)])]).await;
    let answer = pending.await.unwrap().expect("answered at 6").into_inner();
    assert_eq!((answer.revision, answer.variant.as_str()), (6, "on"));
    leaf.stop().await;
    parent.stop().await;
}

#[tokio::test]
async fn a_parent_cut_off_from_the_writer_serves_its_followers_which_see_the_staleness() {
    let mut writer = FakeUpstream::start().await;
    let parent = Replica::start(parent_config(&writer.url, |c| {
        c.replication_heartbeat_ms = 100;
        c.upstream_silence_s = 600;
    }))
    .await;
    let to_parent = writer.next().await;
    to_parent
        .send(snapshot(5, vec![flag("prod", "a", 3)]))
        .await;
    to_parent.send([heartbeat(5)]).await;
    let leaf = Replica::start(Config::local(parent.url.clone())).await;
    eventually("the leaf at 5", || leaf.handles.state.revision() == 5).await;

    // The writer says nothing more (its stream stays open and silent). The parent keeps
    // heartbeating its followers every 100 ms, but the staleness they carry is the writer's.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let parent_stale = parent.handles.status.staleness().unwrap();
    let leaf_stale = leaf.handles.status.staleness().unwrap();
    assert!(
        parent_stale >= Duration::from_millis(1400),
        "parent {parent_stale:?}"
    );
    assert!(
        leaf_stale >= Duration::from_millis(1200),
        "the leaf's staleness is the writer's, not its parent's: {leaf_stale:?}"
    );
    assert!(
        leaf.handles.status.connected(),
        "the leaf is still subscribed"
    );
    assert_eq!(variant(&leaf, "prod", "a").await.unwrap(), ("on".into(), 5));

    // The writer is heard again: the staleness falls at once on the leaf too.
    to_parent.send([heartbeat(5)]).await;
    eventually("fresh again", || {
        leaf.handles
            .status
            .staleness()
            .is_some_and(|s| s < Duration::from_millis(500))
    })
    .await;

    // The writer goes away altogether: both keep serving what they hold, and the parent keeps
    // serving new followers from its own state.
    drop(to_parent);
    drop(writer);
    let late = Replica::start(Config::local(parent.url.clone())).await;
    eventually("a new follower served from the parent's state", || {
        late.handles.state.revision() == 5
    })
    .await;
    assert_eq!(variant(&late, "prod", "a").await.unwrap().0, "on");
    assert_eq!(variant(&leaf, "prod", "a").await.unwrap().0, "on");
    late.stop().await;
    leaf.stop().await;
    parent.stop().await;
}

#[tokio::test]
async fn a_new_history_at_the_writer_reaches_every_follower_as_a_snapshot() {
    let mut writer = FakeUpstream::start().await;
    let parent = Replica::start(parent_config(&writer.url, |_| {})).await;
    let to_parent = writer.next().await;
    to_parent
        .send(snapshot(
            8,
            vec![flag("prod", "a", 3), flag("prod", "b", 8)],
        ))
        .await;
    let leaf = Replica::start(Config::local(parent.url.clone())).await;
    eventually("the leaf at 8", || leaf.handles.state.revision() == 8).await;

    // The writer was restored from a backup: an older revision, another history.
    to_parent.send(restored("restored")).await;
    eventually("the leaf holds the restored history", || {
        let held = leaf.handles.state.load();
        held.revision == 4 && held.history.id == "restored"
    })
    .await;
    assert_eq!(
        variant(&leaf, "prod", "b").await.unwrap_err().code(),
        Code::NotFound,
        "b does not exist in the restored history"
    );
    assert_eq!(leaf.handles.status.snapshots(), 2);
    leaf.stop().await;
    parent.stop().await;
}

#[tokio::test]
async fn followers_need_a_sync_token_are_bounded_and_get_only_namespaces_the_parent_holds() {
    let dir = temp_dir("chain-auth");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, TOKENS).unwrap();
    let mut writer = FakeUpstream::start().await;
    let parent = Replica::start(parent_config(&writer.url, |c| {
        c.dev_no_auth = false;
        c.tokens_file = Some(tokens.clone());
        c.namespaces = vec!["prod".into(), "dev".into()];
        c.max_replication_streams = 2;
    }))
    .await;
    let to_parent = writer.next().await;
    to_parent
        .send(snapshot(
            5,
            vec![
                flag("prod", "a", 3),
                flag("dev", "b", 4),
                flag("ops", "c", 5),
            ],
        ))
        .await;
    eventually("the parent at 5", || parent.handles.state.revision() == 5).await;

    let all = pb::SubscribeRequest::default();
    let prod = pb::SubscribeRequest {
        namespaces: vec!["prod".into()],
        ..Default::default()
    };
    let refused = subscribe_with(&parent.url, None, prod.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = subscribe_with(
        &parent.url,
        Some("web-eval-secret-0123456789"),
        prod.clone(),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let token = Some("leaf-sync-secret-0123456789");
    let refused = subscribe_with(&parent.url, token, all).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().starts_with("namespaces:"), "{refused:?}");
    let ops = pb::SubscribeRequest {
        namespaces: vec!["prod".into(), "ops".into()],
        ..Default::default()
    };
    let refused = subscribe_with(&parent.url, token, ops).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("\"ops\""), "{refused:?}");

    // A follower of `prod` gets `prod` only, then changes elsewhere as empty changes.
    let mut stream = subscribe_with(&parent.url, token, prod.clone())
        .await
        .unwrap();
    let Kind::SnapshotBegin(begin) = next(&mut stream).await else {
        panic!("a snapshot first")
    };
    assert_eq!(
        (begin.revision, begin.history_id.as_str(), begin.chain),
        (5, HISTORY, chain(5))
    );
    let Kind::SnapshotChunk(chunk) = next(&mut stream).await else {
        panic!("a chunk")
    };
    let keys: Vec<_> = chunk.flags.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(keys, ["a"]);
    assert!(matches!(next(&mut stream).await, Kind::SnapshotEnd(_)));
    to_parent
        .send([
            put(6, vec![flag("dev", "d", 6)]),
            put(7, vec![flag("prod", "e", 7)]),
        ])
        .await;
    let Kind::Change(dev_change) = next(&mut stream).await else {
        panic!("a change")
    };
    assert_eq!((dev_change.revision, dev_change.deltas.len()), (6, 0));
    assert_eq!(dev_change.chain, chain(6));
    let Kind::Change(prod_change) = next(&mut stream).await else {
        panic!("a change")
    };
    assert_eq!((prod_change.revision, prod_change.deltas.len()), (7, 1));

    // Two followers at most.
    let _second = subscribe_with(&parent.url, token, prod.clone())
        .await
        .unwrap();
    let refused = subscribe_with(&parent.url, token, prod).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    parent.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_replica_without_serve_replication_does_not_serve_the_stream() {
    let mut writer = FakeUpstream::start().await;
    let replica = Replica::start(Config::local(writer.url.clone())).await;
    let to_replica = writer.next().await;
    to_replica
        .send(snapshot(5, vec![flag("prod", "a", 3)]))
        .await;
    eventually("at 5", || replica.handles.state.revision() == 5).await;
    let refused = subscribe_with(&replica.url, None, pb::SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented);
    replica.stop().await;
}

#[tokio::test]
async fn a_follower_ahead_of_its_parent_waits_for_it_unless_the_writer_is_behind_the_follower() {
    let mut writer = FakeUpstream::start().await;
    let parent = Replica::start(parent_config(&writer.url, |_| {})).await;
    let to_parent = writer.next().await;
    to_parent
        .send(snapshot(5, vec![flag("prod", "a", 3)]))
        .await;
    // The writer is at 9; the parent, at 5, is catching up.
    to_parent.send([heartbeat(9)]).await;
    eventually("the parent at 5", || parent.handles.state.revision() == 5).await;
    eventually("the parent heard the writer's head", || {
        parent.handles.status.head() == 9
    })
    .await;

    // A follower that applied 7 elsewhere (the writer, another replica) is not sent back to 5:
    // it waits, and resumes after 7 once the parent gets there.
    let request = pb::SubscribeRequest {
        from_revision: 7,
        chain: chain(7),
        ..Default::default()
    };
    let mut ahead = subscribe_with(&parent.url, None, request).await.unwrap();
    to_parent
        .send([
            put(6, vec![flag("prod", "b", 6)]),
            put(7, vec![flag("prod", "c", 7)]),
            put(8, vec![flag("prod", "d", 8)]),
        ])
        .await;
    let Kind::Change(first) = next(&mut ahead).await else {
        panic!("a change, not a snapshot")
    };
    assert_eq!(first.revision, 8);

    // The writer comes back restored from a backup, at 4: a follower at 8 holds a history the
    // writer no longer has, and gets the writer's as a snapshot instead of waiting for it.
    drop(to_parent);
    let to_parent = writer.next().await;
    assert_eq!(to_parent.request.from_revision, 8);
    to_parent.send(restored(HISTORY)).await;
    to_parent.send([heartbeat(4)]).await;
    eventually("the parent holds the restored state", || {
        parent.handles.state.revision() == 4
    })
    .await;
    let Kind::SnapshotBegin(begin) = next(&mut ahead).await else {
        panic!("the connected follower gets the restored state")
    };
    assert_eq!((begin.revision, begin.chain), (4, vec![4; 16]));
    let request = pb::SubscribeRequest {
        from_revision: 8,
        chain: chain(8),
        ..Default::default()
    };
    let mut returning = subscribe_with(&parent.url, None, request).await.unwrap();
    let Kind::SnapshotBegin(begin) = next(&mut returning).await else {
        panic!("a snapshot for a follower from the lost history")
    };
    assert_eq!(begin.revision, 4);
    parent.stop().await;
}
