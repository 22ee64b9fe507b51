//! The follower against a fake upstream Replication server fed by channels: snapshot then
//! changes, resync on a gap or a protocol error (never a skip), reconnect from the applied
//! revision without a snapshot, heartbeats, silence, and a clean exit at shutdown.

mod support;

use std::sync::Arc;
use std::time::Duration;

use flagread::follower::{self, Backoff, SyncStatus, Upstream};
use flagread::state::State;
use flagstream::pb;
use flagstream::pb::sync_message::Kind;
use support::*;
use tokio::sync::watch;
use tonic::transport::Endpoint;

/// A follower of `fake` with a short backoff; dropping the returned sender stops it.
fn start(
    fake: &FakeUpstream,
    silence: Duration,
) -> (
    Arc<State>,
    Arc<SyncStatus>,
    watch::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let state = Arc::new(State::new(None));
    let status = Arc::new(SyncStatus::new());
    let upstream = Upstream {
        endpoint: Endpoint::from_shared(fake.url.clone()).unwrap(),
        token: Some("sync-secret-0123456789".into()),
        backoff: Backoff {
            min: Duration::from_millis(10),
            max: Duration::from_millis(50),
        },
        silence,
    };
    let (stop, stopped) = watch::channel(());
    let task = tokio::spawn(follower::follow(
        upstream,
        state.clone(),
        status.clone(),
        None,
        stopped,
    ));
    (state, status, stop, task)
}

fn has_flag(state: &State, ns: &str, key: &str) -> bool {
    state
        .load()
        .namespaces
        .get(ns)
        .is_some_and(|n| n.flags.get(key).is_some())
}

#[tokio::test]
async fn snapshot_then_changes_then_resume_without_snapshot() {
    let mut fake = FakeUpstream::start().await;
    let (state, status, stop, task) = start(&fake, Duration::from_secs(30));

    let first = fake.next().await;
    assert_eq!(
        first.request.from_revision, 0,
        "no state yet: ask for everything"
    );
    assert_eq!(
        first.authorization.as_deref(),
        Some("Bearer sync-secret-0123456789")
    );
    // A snapshot is not visible until its end.
    first
        .send(
            snapshot(5, vec![flag("prod", "a", 3), flag("prod", "b", 5)])
                .into_iter()
                .take(2),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !state.is_ready() && state.revision() == 0,
        "half a snapshot is never published"
    );
    first
        .send([message(Kind::SnapshotEnd(pb::SnapshotEnd { revision: 5 }))])
        .await;
    eventually("the snapshot", || state.revision() == 5).await;
    assert!(state.is_ready() && has_flag(&state, "prod", "a") && has_flag(&state, "prod", "b"));

    first
        .send([
            put(6, vec![flag("prod", "c", 6)]),
            delete(7, "prod", "a"),
            heartbeat(7),
        ])
        .await;
    eventually("two changes", || state.revision() == 7).await;
    assert!(!has_flag(&state, "prod", "a") && has_flag(&state, "prod", "c"));
    eventually("the heartbeat", || status.head() == 7).await;
    assert!(status.connected());

    // The writer goes away: the follower comes back from revision 7 and keeps its state.
    drop(first);
    let second = fake.next().await;
    assert_eq!(
        second.request.from_revision, 7,
        "resume from the applied revision"
    );
    assert!(
        has_flag(&state, "prod", "c"),
        "the state is kept while reconnecting"
    );
    second.send([put(8, vec![flag("prod", "d", 8)])]).await;
    eventually("the change after resuming", || state.revision() == 8).await;
    assert_eq!(status.snapshots(), 1, "resuming takes no new snapshot");

    drop(stop);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the follower exits at shutdown")
        .unwrap();
    assert!(!status.connected());
}

#[tokio::test]
async fn a_gap_or_a_protocol_error_resyncs_and_never_skips() {
    // Each case: the messages after a snapshot at revision 10, and what the state must be at the
    // next subscription (the revision asked for), with nothing of the bad message applied.
    async fn check(bad: Vec<pb::SyncMessage>, expected_from: u64) {
        let mut fake = FakeUpstream::start().await;
        let (state, status, _stop, _task) = start(&fake, Duration::from_secs(30));
        let first = fake.next().await;
        first.send(snapshot(10, vec![flag("prod", "a", 10)])).await;
        eventually("the snapshot", || state.revision() == 10).await;
        first.send(bad).await;
        let second = fake.next().await;
        assert_eq!(second.request.from_revision, expected_from);
        assert_eq!(state.revision(), expected_from);
        assert!(
            !has_flag(&state, "prod", "x"),
            "nothing of the bad message is applied"
        );
        assert_eq!(status.resyncs(), 1);
    }
    check(vec![put(12, vec![flag("prod", "x", 12)])], 10).await;
    check(vec![put(10, vec![flag("prod", "x", 10)])], 10).await;
    check(
        vec![
            put(11, vec![flag("prod", "b", 11)]),
            put(13, vec![flag("prod", "x", 13)]),
        ],
        11,
    )
    .await;
    let chunk = message(Kind::SnapshotChunk(pb::SnapshotChunk {
        flags: vec![flag("prod", "x", 3).into()],
        ..Default::default()
    }));
    check(vec![chunk], 10).await;
    let mut mid_snapshot = snapshot(20, vec![flag("prod", "x", 20)]);
    mid_snapshot.truncate(2);
    mid_snapshot.push(put(21, vec![flag("prod", "x", 21)]));
    check(mid_snapshot, 10).await;
    check(vec![pb::SyncMessage { kind: None }], 10).await;
}

#[tokio::test]
async fn a_new_snapshot_replaces_the_state_whole() {
    let mut fake = FakeUpstream::start().await;
    let (state, _status, _stop, _task) = start(&fake, Duration::from_secs(30));
    let mut changes = state.subscribe_changes();
    let first = fake.next().await;
    first
        .send(snapshot(4, vec![flag("prod", "a", 4), flag("dev", "b", 2)]))
        .await;
    eventually("the first snapshot", || state.revision() == 4).await;
    // The writer says the replica fell behind its window: a fresh snapshot.
    first.send(snapshot(40, vec![flag("prod", "z", 40)])).await;
    eventually("the second snapshot", || state.revision() == 40).await;
    let replica = state.load();
    assert!(has_flag(&state, "prod", "z") && !has_flag(&state, "prod", "a"));
    assert!(
        !replica.namespaces.contains_key("dev"),
        "namespaces gone from the snapshot are dropped"
    );
    let mut refreshes = 0;
    while let Ok(applied) = changes.try_recv() {
        refreshes += usize::from(applied.full_refresh);
    }
    assert_eq!(refreshes, 2);
}

#[tokio::test]
async fn a_silent_writer_is_left_and_followed_again() {
    let mut fake = FakeUpstream::start().await;
    let (state, status, _stop, _task) = start(&fake, Duration::from_millis(300));
    let first = fake.next().await;
    first.send(snapshot(3, vec![flag("prod", "a", 3)])).await;
    eventually("the snapshot", || state.revision() == 3).await;
    // The stream stays open but nothing comes: the follower must not wait forever.
    let second = fake.next().await;
    assert_eq!(second.request.from_revision, 3);
    assert!(
        status
            .staleness()
            .is_some_and(|s| s >= Duration::from_millis(300))
    );
    drop(first);
}

#[tokio::test]
async fn the_namespaces_followed_are_asked_for() {
    let mut fake = FakeUpstream::start().await;
    let state = Arc::new(State::new(Some(["prod".to_string()].into_iter().collect())));
    let upstream = Upstream {
        endpoint: Endpoint::from_shared(fake.url.clone()).unwrap(),
        token: None,
        backoff: Backoff::default(),
        silence: Duration::from_secs(30),
    };
    let (_stop, stopped) = watch::channel(());
    tokio::spawn(follower::follow(
        upstream,
        state.clone(),
        Arc::new(SyncStatus::new()),
        None,
        stopped,
    ));
    let first = fake.next().await;
    assert_eq!(first.request.namespaces, vec!["prod".to_string()]);
    assert_eq!(first.authorization, None);
    // Objects of other namespaces are ignored even if sent.
    first
        .send(snapshot(2, vec![flag("prod", "a", 1), flag("dev", "b", 2)]))
        .await;
    eventually("the snapshot", || state.revision() == 2).await;
    assert!(has_flag(&state, "prod", "a") && !state.load().namespaces.contains_key("dev"));
}
