//! Replica chaining: a replica started with `--serve-replication` serves the Replication stream
//! to followers of its own, from its own state, so replicas can follow replicas (a tree that fans
//! out beyond one writer, or a region that follows one local replica).
//!
//! The [`Relay`] is the replica's [`Source`] for `flagstream::kit::replication`:
//! - its feed holds the last changes the follower applied, as the writer encoded them (and the
//!   form without deltas), published after each is applied; a snapshot installed from upstream
//!   resets it (a new epoch), so every follower gets a fresh snapshot;
//! - a snapshot is the state held, encoded (shared by followers that ask together);
//! - revisions, history positions and the history identity pass through unchanged, so a follower
//!   resumes from a relay exactly as from the writer, and can move between the two;
//! - heartbeats carry the writer's head as last heard and how long ago the writer was last heard
//!   (`silence_ms`), relayed as soon as the writer's own arrive: a leaf knows how far it is
//!   behind the writer, not only behind its parent;
//! - a follower ahead of the relay (the relay restarted from an older snapshot file) waits for
//!   it to catch up instead of being sent back in time, unless the writer itself is behind the
//!   follower (restored from a backup): then it gets the writer's history as a snapshot.
//!
//! A relay whose upstream is gone keeps serving its followers from the state it holds; its
//! heartbeats then tell them how stale it is.

use std::collections::BTreeSet;
use std::sync::Arc;

use flagstream::kit::replication::{
    self, EncodedChange, EncodedSnapshot, Feed, Source, Subscribers,
};
use flagstream::pb;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::watch;
use tonic::Status;

use crate::follower::SyncStatus;
use crate::state::State;

/// What a chaining replica serves the stream from: its state and the changes it applied.
pub struct Relay {
    state: Arc<State>,
    status: Arc<SyncStatus>,
    feed: Feed,
}

impl Relay {
    /// A relay over `state`, keeping the last `retain` applied changes for followers to resume
    /// from. It serves nothing until the state is whole.
    pub fn new(state: Arc<State>, status: Arc<SyncStatus>, retain: usize) -> Relay {
        let relay = Relay {
            feed: Feed::new(0, 0, 0, retain),
            state,
            status,
        };
        // A state installed before the relay existed (the snapshot file) is served at once.
        let held = relay.state.load();
        if held.ready {
            relay.installed(held.revision, held.history.chain.clone());
        }
        relay
    }

    /// The follower applied `change` (encoded by [`Relay::encode`] before it was applied).
    pub fn applied(&self, change: EncodedChange) {
        self.feed.publish(change);
    }

    /// A whole state at `revision` (position `chain`) replaced the one held.
    pub fn installed(&self, revision: u64, chain: Vec<u8>) {
        self.feed.reset(revision, chain);
    }

    /// Encodes a change as received, for [`Relay::applied`].
    pub fn encode(change: &pb::Change) -> EncodedChange {
        EncodedChange::new(change, namespace_of(change))
    }
}

/// The namespace a change's deltas are in (a write touches one); empty when it has none.
fn namespace_of(change: &pb::Change) -> String {
    use pb::delta::Kind;
    let Some(kind) = change.deltas.first().and_then(|d| d.kind.as_ref()) else {
        return String::new();
    };
    match kind {
        Kind::PutNamespace(ns) => ns.key.clone(),
        Kind::DeleteNamespace(key) => key.clone(),
        Kind::PutFlag(flag) => flag.namespace.clone(),
        Kind::DeleteFlag(object) | Kind::DeleteSegment(object) => object.namespace.clone(),
        Kind::PutSegment(segment) => segment.namespace.clone(),
    }
}

impl Source for Relay {
    fn feed(&self) -> &Feed {
        &self.feed
    }

    fn check_namespaces(&self, namespaces: Option<&BTreeSet<String>>) -> Result<(), Status> {
        let Some(held) = self.state.filter() else {
            return Ok(());
        };
        let list = || held.iter().cloned().collect::<Vec<_>>().join(", ");
        match namespaces {
            None => Err(Status::failed_precondition(format!(
                "namespaces: this replica follows only {}; ask for some of them, or follow the writer",
                list()
            ))),
            Some(asked) => match asked.iter().find(|ns| !held.contains(*ns)) {
                Some(missing) => Err(Status::failed_precondition(format!(
                    "namespaces: this replica does not follow {missing:?} (only {}); follow the writer for it",
                    list()
                ))),
                None => Ok(()),
            },
        }
    }

    fn snapshot(
        &self,
        namespaces: Option<&BTreeSet<String>>,
        chunk_bytes: usize,
    ) -> Result<EncodedSnapshot, String> {
        let held = self.state.load();
        if !held.ready {
            return Err("this replica holds no state yet".into());
        }
        let snapshot = held.to_snapshot();
        Ok(replication::encode_snapshot(
            snapshot.revision,
            snapshot.history.chain,
            snapshot.history.id,
            namespaces,
            snapshot.namespaces.into_iter().map(pb::Namespace::from),
            snapshot.segments.into_iter().map(pb::Segment::from),
            snapshot.flags.into_iter().map(pb::Flag::from),
            chunk_bytes,
        ))
    }

    fn position(&self, revision: u64) -> Result<Option<Vec<u8>>, String> {
        Ok(self.feed.position(revision))
    }

    fn read_log(
        &self,
        _after: u64,
        _head: u64,
        _max: usize,
    ) -> Result<Option<Vec<EncodedChange>>, String> {
        // A replica keeps no log beyond its feed: a follower further behind gets a snapshot.
        Ok(None)
    }

    fn heartbeat(&self) -> pb::Heartbeat {
        let held = self.state.load();
        pb::Heartbeat {
            head_revision: self.status.head().max(held.revision),
            time: self.status.writer_time(),
            history_id: held.history.id.clone(),
            silence_ms: self.status.staleness().map_or(u64::MAX, |s| {
                u64::try_from(s.as_millis()).unwrap_or(u64::MAX - 1)
            }),
        }
    }

    fn beats(&self) -> Option<watch::Receiver<u64>> {
        Some(self.status.subscribe_beats())
    }

    fn may_reach(&self, revision: u64) -> bool {
        // Behind its upstream (restarted from an older snapshot file, or a follower that came
        // from a fresher upstream): it will catch up. Unless the writer itself, as heard on the
        // open subscription, is behind the follower: then the follower's history is gone.
        !self.status.writer_is_behind(revision)
    }
}

/// Exports the followers of a relay: how many, how far the one furthest behind is behind this
/// replica's applied revision, and the snapshots built for them (counted at scrape time: one
/// series per follower would churn on every reconnect).
pub fn register_metrics(
    registry: &mut prometheus_client::registry::Registry,
    followers: Arc<Subscribers>,
    state: Arc<State>,
) {
    registry.register_collector(Box::new(FollowerCollector { followers, state }));
}

/// The collector [`register_metrics`] adds.
struct FollowerCollector {
    followers: Arc<Subscribers>,
    state: Arc<State>,
}

impl std::fmt::Debug for FollowerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowerCollector").finish_non_exhaustive()
    }
}

impl Collector for FollowerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (count, lag) = self.followers.count_and_lag(self.state.revision());
        for (name, help, value) in [
            (
                "flagread_replication_followers",
                "Replicas following this one (--serve-replication)",
                count as i64,
            ),
            (
                "flagread_replication_follower_lag_revisions",
                "Revisions the follower furthest behind is behind this replica (0 without followers)",
                lag as i64,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let counter = ConstCounter::new(self.followers.snapshots_built());
        counter.encode(encoder.encode_descriptor(
            "flagread_replication_snapshots_built",
            "Snapshots built for followers; followers asking at about the same time share one",
            None,
            counter.metric_type(),
        )?)?;
        Ok(())
    }
}
