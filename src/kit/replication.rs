//! The server side of the Replication change stream, shared by flagwrite (the source of truth)
//! and by a flagread replica that serves followers of its own (`--serve-replication`).
//!
//! # Design
//! - A [`Source`] is what a stream is served from: the writer's store and feed, or a replica's
//!   state and the changes it applied. It owns a [`Feed`]: the last few thousand changes, each
//!   encoded once, and a `watch` of the head it can serve.
//! - Per subscriber: one task and one bounded `mpsc` channel. The task sends a snapshot if the
//!   subscriber's revision is 0, unknown, or from another history; then changes from the feed
//!   while it holds the next revision, otherwise from the source's log (the writer's change log
//!   on disk; a replica has none and sends a snapshot); then waits for the head to move, sending
//!   heartbeats. A slow subscriber blocks nothing but its own task.
//! - Snapshots are shared ([`SharedSnapshots`]): subscribers that need one at about the same
//!   time, for the same namespaces, get the same encoded chunks (`Bytes`), built once on the
//!   blocking pool. A rolling restart of N replicas costs one copy of the state, not N.
//! - Every message is served pre-encoded: the stream's messages are [`WireMessage`], a
//!   hand-written prost message with the same field numbers as `pb::SyncMessage` whose variants
//!   hold encoded bytes, so shared bytes are copied into each response frame, never re-encoded.
//!
//! # Epochs
//! A replica's history can change under its followers: it installs a snapshot from its own
//! upstream (a writer restored from a backup, or a replica that fell out of the writer's
//! window). It then [`Feed::reset`]s its feed, which starts a new epoch; every subscriber task
//! notices the new epoch and sends a fresh snapshot instead of continuing. The writer's feed has
//! one epoch for its lifetime.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::{OnceCell, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::{Request, Response, Status};

use crate::kit::auth;
use crate::pb;

/// `pb::SyncMessage` with every variant pre-encoded.
#[derive(Clone, PartialEq, Message)]
pub struct WireMessage {
    #[prost(oneof = "Wire", tags = "1, 2, 3, 4, 5")]
    pub kind: Option<Wire>,
}

/// The variants of [`WireMessage`]: encoded `SnapshotBegin`, …, `Heartbeat`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Wire {
    #[prost(bytes = "bytes", tag = "1")]
    SnapshotBegin(Bytes),
    #[prost(bytes = "bytes", tag = "2")]
    SnapshotChunk(Bytes),
    #[prost(bytes = "bytes", tag = "3")]
    SnapshotEnd(Bytes),
    #[prost(bytes = "bytes", tag = "4")]
    Change(Bytes),
    #[prost(bytes = "bytes", tag = "5")]
    Heartbeat(Bytes),
}

/// One change, encoded once for every subscriber.
#[derive(Debug, Clone)]
pub struct EncodedChange {
    pub revision: u64,
    /// The namespace the write touched; empty when unknown (a change a replica received without
    /// its deltas), which serves `empty` to everybody.
    pub namespace: String,
    /// The history position after the change.
    pub chain: Vec<u8>,
    /// The encoded `pb::Change` with all its deltas.
    pub full: Bytes,
    /// The encoded `pb::Change` without deltas, for subscribers that do not follow `namespace`.
    pub empty: Bytes,
}

/// A head the feed can serve: the revision, and the epoch of the history it belongs to (0 while
/// the source holds no state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    pub epoch: u64,
    pub revision: u64,
}

/// Recent changes and the head revision, shared by every subscriber of a source.
pub struct Feed {
    /// The last `capacity` changes, in revision order without gaps, and the position of the
    /// revision just before the first of them.
    ring: Mutex<Ring>,
    capacity: usize,
    /// The head subscribers may be sent (the writer's durable revision, a replica's applied
    /// revision); subscribers wait on changes of it.
    head: watch::Sender<Head>,
    /// The highest revision no longer available to resume after, in the feed or the source's
    /// log.
    compacted: AtomicU64,
}

/// The inside of a [`Feed`].
struct Ring {
    changes: VecDeque<EncodedChange>,
    /// The revision and position the ring starts after (set by [`Feed::reset`]); `None` when
    /// unknown (the writer, which reads positions from its store).
    base: Option<(u64, Vec<u8>)>,
}

/// A snapshot, encoded: a `SnapshotBegin` and its chunks.
#[derive(Debug)]
pub struct EncodedSnapshot {
    /// The revision it was taken at.
    pub revision: u64,
    /// The encoded `SnapshotBegin`.
    pub begin: Bytes,
    /// The encoded `SnapshotChunk`s.
    pub chunks: Vec<Bytes>,
}

/// What a stream is served from.
pub trait Source: Send + Sync + 'static {
    /// The source's feed.
    fn feed(&self) -> &Feed;

    /// Refuses the namespaces a subscriber asks for (`None`: all) if this source cannot serve
    /// them; the status names the field.
    fn check_namespaces(&self, namespaces: Option<&BTreeSet<String>>) -> Result<(), Status>;

    /// Takes a snapshot of the namespaces in `namespaces` (all when `None`), chunks of about
    /// `chunk_bytes`. Blocking: called on the blocking pool.
    fn snapshot(
        &self,
        namespaces: Option<&BTreeSet<String>>,
        chunk_bytes: usize,
    ) -> Result<EncodedSnapshot, String>;

    /// The history position at `revision`, if known. Blocking.
    fn position(&self, revision: u64) -> Result<Option<Vec<u8>>, String>;

    /// Up to `max` changes after `after`, at most up to `head`, from a log beyond the feed;
    /// `None` when they are gone (a snapshot is sent instead). Blocking.
    fn read_log(
        &self,
        after: u64,
        head: u64,
        max: usize,
    ) -> Result<Option<Vec<EncodedChange>>, String>;

    /// The heartbeat to send now.
    fn heartbeat(&self) -> pb::Heartbeat;

    /// A receiver that changes whenever a heartbeat should go out at once (a replica hearing its
    /// upstream's); `None` when heartbeats are only sent on the timer.
    fn beats(&self) -> Option<watch::Receiver<u64>>;

    /// Whether the source may yet reach `revision`, beyond its head, in the history it holds: a
    /// subscriber that far ahead then waits for it to catch up rather than being sent back in
    /// time by a snapshot (a replica lagging its own upstream). `false` when the subscriber must
    /// hold another history (always for the writer, whose head is the truth). Asked again
    /// whenever the head moves or a heartbeat goes out.
    fn may_reach(&self, revision: u64) -> bool;
}

/// Settings of the stream.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Time between heartbeats while nothing else is sent.
    pub heartbeat: Duration,
    /// Target size of one snapshot chunk, in encoded bytes.
    pub chunk_bytes: usize,
    /// Subscribers served at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_subscribers: usize,
}

/// Connected subscribers, with the last revision each was sent: counted at scrape time (one
/// series per connection would churn on every reconnect).
#[derive(Debug, Default)]
pub struct Subscribers {
    sent: Mutex<BTreeMap<u64, Arc<AtomicU64>>>,
    next: AtomicU64,
    /// Snapshots built so far (a snapshot shared by many subscribers counts once).
    snapshots_built: AtomicU64,
}

/// Registers a subscriber while it lives; dropping it unregisters.
pub struct SubscriberGuard {
    subscribers: Arc<Subscribers>,
    id: u64,
    /// The last revision sent to this subscriber.
    pub sent: Arc<AtomicU64>,
}

/// The Replication service over a [`Source`].
pub struct Replication<S> {
    source: Arc<S>,
    config: StreamConfig,
    snapshots: Arc<SharedSnapshots>,
    subscribers: Arc<Subscribers>,
    /// One permit per subscriber served; bounds the tasks and channels a caller can hold.
    permits: Arc<Semaphore>,
    /// Becomes true at shutdown; every subscriber task then ends its stream.
    shutdown: watch::Receiver<bool>,
}

/// The tonic service for [`Replication`] (generated code's shape, with the pre-encoded message
/// type).
pub struct ReplicationServer<S, I> {
    inner: Replication<S>,
    interceptor: I,
}

/// Messages sent per step when catching up, between checks for shutdown.
const CATCH_UP_STEP: usize = 256;

/// A snapshot is shared with a later subscriber only while at most this many revisions were
/// committed after it: the newcomer catches up on them from the feed.
pub const SHARE_WINDOW: u64 = 1024;

/// How long a built snapshot stays shareable after it was built, even with no subscriber
/// streaming it: the replicas of a rolling restart ask within a few seconds of each other. It
/// is freed then, so a source at rest holds no snapshot.
pub const SNAPSHOT_LINGER: Duration = Duration::from_secs(5);

/// Snapshots built at once, over all namespace selections (each holds a decoded and an encoded
/// copy of its part of the state while it is built).
const CONCURRENT_BUILDS: usize = 2;

impl Feed {
    /// A feed whose head is `revision` in epoch `epoch` (0: no state yet), after `compacted`,
    /// keeping `capacity` changes.
    pub fn new(epoch: u64, revision: u64, compacted: u64, capacity: usize) -> Feed {
        Feed {
            ring: Mutex::new(Ring {
                changes: VecDeque::with_capacity(capacity.clamp(1, 4096)),
                base: None,
            }),
            capacity: capacity.max(1),
            head: watch::Sender::new(Head { epoch, revision }),
            compacted: AtomicU64::new(compacted),
        }
    }

    /// Adds a change (in revision order, the head's revision + 1) and makes it the head.
    pub fn publish(&self, change: EncodedChange) {
        let revision = change.revision;
        {
            let mut ring = self.lock();
            // A relay's feed is all it has: what leaves it can no longer be resumed after. (The
            // writer's log on disk still has it; the writer sets `compacted` itself.)
            if ring.changes.len() == self.capacity
                && let Some(gone) = ring.changes.pop_front()
                && ring.base.is_some()
            {
                ring.base = Some((gone.revision, gone.chain));
                self.compacted.fetch_max(gone.revision, Ordering::AcqRel);
            }
            ring.changes.push_back(change);
        }
        self.head.send_modify(|head| head.revision = revision);
    }

    /// Replaces everything with a new state at `revision` (position `chain`): the ring empties,
    /// nothing before `revision` can be resumed after, and a new epoch begins, which sends every
    /// subscriber a snapshot.
    pub fn reset(&self, revision: u64, chain: Vec<u8>) {
        {
            let mut ring = self.lock();
            ring.changes.clear();
            ring.base = Some((revision, chain));
            self.compacted.store(revision, Ordering::Release);
        }
        self.head.send_modify(|head| {
            head.epoch += 1;
            head.revision = revision;
        });
    }

    /// The head revision.
    pub fn head(&self) -> u64 {
        self.head.borrow().revision
    }

    /// The head revision and its epoch.
    pub fn head_state(&self) -> Head {
        *self.head.borrow()
    }

    /// Waits until `revision` is the head or behind it, for at most `limit`; whether it is.
    pub async fn wait_durable(&self, revision: u64, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.until_durable(revision))
            .await
            .is_ok()
    }

    /// Returns once the head is at least `revision`.
    pub async fn until_durable(&self, revision: u64) {
        let mut head = self.head.subscribe();
        // The sender lives in `self`, so the wait cannot end with an error.
        let _ = head.wait_for(|h| h.revision >= revision).await;
    }

    /// A receiver notified whenever the head moves (or a new epoch begins).
    pub fn subscribe_head(&self) -> watch::Receiver<Head> {
        self.head.subscribe()
    }

    pub fn compacted(&self) -> u64 {
        self.compacted.load(Ordering::Acquire)
    }

    pub fn set_compacted(&self, revision: u64) {
        self.compacted.store(revision, Ordering::Release);
    }

    /// The changes after `after`, up to `max`, if the feed still holds `after + 1` (or `after`
    /// is the last it holds); `None` when the subscriber must read the log.
    pub fn after(&self, after: u64, max: usize) -> Option<Vec<EncodedChange>> {
        let ring = self.lock();
        let first = match ring.changes.front() {
            Some(change) => change.revision,
            None => return None,
        };
        if after + 1 < first {
            return None;
        }
        let start = (after + 1 - first) as usize;
        Some(ring.changes.iter().skip(start).take(max).cloned().collect())
    }

    /// The history position at `revision` if the feed knows it (a change it holds, or the
    /// revision it was reset to).
    pub fn position(&self, revision: u64) -> Option<Vec<u8>> {
        let ring = self.lock();
        if let Some((base, chain)) = &ring.base
            && *base == revision
        {
            return Some(chain.clone());
        }
        let first = ring.changes.front()?.revision;
        let index = usize::try_from(revision.checked_sub(first)?).ok()?;
        ring.changes.get(index).map(|change| change.chain.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl EncodedChange {
    /// Encodes `change`, a write to `namespace` (empty: unknown).
    pub fn new(change: &pb::Change, namespace: String) -> EncodedChange {
        let empty = pb::Change {
            revision: change.revision,
            time: change.time,
            deltas: Vec::new(),
            chain: change.chain.clone(),
        };
        let empty = Bytes::from(empty.encode_to_vec());
        let full = if change.deltas.is_empty() {
            empty.clone()
        } else {
            Bytes::from(change.encode_to_vec())
        };
        EncodedChange {
            revision: change.revision,
            namespace,
            chain: change.chain.clone(),
            full,
            empty,
        }
    }
}

/// Builds a snapshot's chunks, each about `limit` encoded bytes, from objects as they come
/// (decoded, or already encoded as the writer stores them). A chunk is a `SnapshotChunk`
/// written field by field: a repeated field may appear in any order on the wire.
pub struct ChunkWriter {
    limit: usize,
    buf: Vec<u8>,
    chunks: Vec<Bytes>,
}

/// The field of `SnapshotChunk` an object goes in.
#[derive(Debug, Clone, Copy)]
pub enum ChunkField {
    Namespace = 1,
    Flag = 2,
    Segment = 3,
}

impl ChunkWriter {
    pub fn new(limit: usize) -> ChunkWriter {
        ChunkWriter {
            limit: limit.max(1),
            buf: Vec::new(),
            chunks: Vec::new(),
        }
    }

    /// Adds an object given as its encoded message.
    pub fn push_encoded(&mut self, field: ChunkField, message: &[u8]) {
        use prost::encoding::{WireType, encode_key, encode_varint};
        encode_key(field as u32, WireType::LengthDelimited, &mut self.buf);
        encode_varint(message.len() as u64, &mut self.buf);
        self.buf.extend_from_slice(message);
        self.cut();
    }

    /// Adds an object.
    pub fn push<M: Message>(&mut self, field: ChunkField, message: &M) {
        use prost::encoding::{WireType, encode_key, encode_varint};
        encode_key(field as u32, WireType::LengthDelimited, &mut self.buf);
        encode_varint(message.encoded_len() as u64, &mut self.buf);
        message.encode_raw(&mut self.buf);
        self.cut();
    }

    /// The chunks.
    pub fn finish(mut self) -> Vec<Bytes> {
        if !self.buf.is_empty() {
            self.chunks.push(Bytes::from(std::mem::take(&mut self.buf)));
        }
        self.chunks
    }

    fn cut(&mut self) {
        if self.buf.len() >= self.limit {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(self.limit + 4096));
            self.chunks.push(Bytes::from(chunk));
        }
    }
}

impl EncodedSnapshot {
    /// A snapshot at `revision` (position `chain`, of history `history_id`) covering
    /// `namespaces` (all when `None`), of the chunks `chunks` wrote.
    pub fn new(
        revision: u64,
        chain: Vec<u8>,
        history_id: String,
        namespaces: Option<&BTreeSet<String>>,
        chunks: ChunkWriter,
    ) -> EncodedSnapshot {
        let begin = pb::SnapshotBegin {
            revision,
            history_id,
            chain,
            namespaces: namespaces.into_iter().flatten().cloned().collect(),
        };
        EncodedSnapshot {
            revision,
            begin: Bytes::from(begin.encode_to_vec()),
            chunks: chunks.finish(),
        }
    }
}

/// Encodes a snapshot at `revision` (position `chain`, of history `history_id`) of the objects
/// given whose namespace is in `namespaces` (all when `None`), in chunks of about `limit`
/// encoded bytes: namespaces, then segments, then flags, so a replica compiles each flag once
/// against its segments.
#[allow(clippy::too_many_arguments)]
pub fn encode_snapshot(
    revision: u64,
    chain: Vec<u8>,
    history_id: String,
    namespaces: Option<&BTreeSet<String>>,
    namespace_records: impl IntoIterator<Item = pb::Namespace>,
    segments: impl IntoIterator<Item = pb::Segment>,
    flags: impl IntoIterator<Item = pb::Flag>,
    limit: usize,
) -> EncodedSnapshot {
    let follows = |ns: &str| namespaces.is_none_or(|f| f.contains(ns));
    let mut chunks = ChunkWriter::new(limit);
    for ns in namespace_records.into_iter().filter(|n| follows(&n.key)) {
        chunks.push(ChunkField::Namespace, &ns);
    }
    for segment in segments.into_iter().filter(|s| follows(&s.namespace)) {
        chunks.push(ChunkField::Segment, &segment);
    }
    for flag in flags.into_iter().filter(|f| follows(&f.namespace)) {
        chunks.push(ChunkField::Flag, &flag);
    }
    EncodedSnapshot::new(revision, chain, history_id, namespaces, chunks)
}

impl Subscribers {
    /// Registers a new subscriber.
    pub fn register(self: &Arc<Self>) -> SubscriberGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let sent = Arc::new(AtomicU64::new(0));
        self.lock().insert(id, sent.clone());
        SubscriberGuard {
            subscribers: self.clone(),
            id,
            sent,
        }
    }

    /// The number of subscribers, and how many revisions the one furthest behind `head` is
    /// behind it (0 without subscribers).
    pub fn count_and_lag(&self, head: u64) -> (usize, u64) {
        let sent = self.lock();
        let lag = sent
            .values()
            .map(|s| head.saturating_sub(s.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(0);
        (sent.len(), lag)
    }

    /// Snapshots built so far; a snapshot shared by many subscribers counts once.
    pub fn snapshots_built(&self) -> u64 {
        self.snapshots_built.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<AtomicU64>>> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.subscribers.lock().remove(&self.id);
    }
}

impl<S> Clone for Replication<S> {
    fn clone(&self) -> Self {
        Replication {
            source: self.source.clone(),
            config: self.config.clone(),
            snapshots: self.snapshots.clone(),
            subscribers: self.subscribers.clone(),
            permits: self.permits.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

impl<S: Source> Replication<S> {
    pub fn new(
        source: Arc<S>,
        subscribers: Arc<Subscribers>,
        config: StreamConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Replication<S> {
        Replication {
            source,
            permits: Arc::new(Semaphore::new(config.max_subscribers)),
            config,
            snapshots: Arc::new(SharedSnapshots::default()),
            subscribers,
            shutdown,
        }
    }

    /// The tonic service, authenticating with `interceptor`.
    pub fn into_server<I>(self, interceptor: I) -> ReplicationServer<S, I> {
        ReplicationServer {
            inner: self,
            interceptor,
        }
    }

    /// Starts a subscriber task and returns its stream.
    pub fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<ReceiverStream<Result<WireMessage, Status>>, Status> {
        let identity = auth::require(&request, "follow the change stream", |id| {
            id.scopes.contains(&auth::Scope::Sync)
        })?;
        let request = request.into_inner();
        let namespaces: Option<BTreeSet<String>> = if request.namespaces.is_empty() {
            None
        } else {
            Some(request.namespaces.into_iter().collect())
        };
        self.source.check_namespaces(namespaces.as_ref())?;
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this server already serves {} subscribers (its limit); follow another replica",
                self.config.max_subscribers
            ))
        })?;
        let (tx, rx) = mpsc::channel(16);
        let follower = Follower {
            service: self.clone(),
            namespaces,
            tx,
            guard: self.subscribers.register(),
            _permit: permit,
        };
        tracing::info!(subscriber = %identity.name, from = request.from_revision, "subscriber connected");
        // The task ends when the client goes away (send fails or the channel closes), at
        // shutdown, or when the source fails.
        tokio::spawn(follower.run(request.from_revision, request.chain));
        Ok(ReceiverStream::new(rx))
    }
}

/// One subscriber's task.
struct Follower<S> {
    service: Replication<S>,
    /// Followed namespaces; `None` for all.
    namespaces: Option<BTreeSet<String>>,
    tx: mpsc::Sender<Result<WireMessage, Status>>,
    guard: SubscriberGuard,
    /// Held while the task lives.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Why a follower stops.
enum Stop {
    /// The client went away or the server is shutting down.
    Done,
    /// The source failed; the stream ends with this status.
    Failed(Status),
}

impl<S: Source> Follower<S> {
    async fn run(mut self, from: u64, chain: Vec<u8>) {
        if let Err(Stop::Failed(status)) = self.follow(from, chain).await {
            tracing::warn!(%status, "subscriber stream failed");
            let _ = self.tx.send(Err(status)).await;
        }
    }

    async fn follow(&mut self, from: u64, chain: Vec<u8>) -> Result<(), Stop> {
        let source = self.service.source.clone();
        let feed = source.feed();
        let mut head_rx = feed.subscribe_head();
        let mut beats = source.beats();
        let mut heartbeat = tokio::time::interval(self.service.config.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first heartbeat goes out at the first wait: a follower learns the writer's head
        // (and, through a replica, its staleness) at once.
        let mut start = *head_rx.borrow_and_update();
        // A source without state (a replica still syncing) serves nothing yet; a subscriber
        // ahead of a replica waits for it to catch up, never going back in time, unless it holds
        // a history the replica cannot reach.
        while start.epoch == 0 || (from > start.revision && source.may_reach(from)) {
            self.wait(&mut head_rx, &mut heartbeat, &mut beats).await?;
            start = *head_rx.borrow_and_update();
        }
        let mut epoch = start.epoch;
        let mut last = from;
        let mut snapshot = from == 0 || from < feed.compacted() || from > start.revision;
        // Resume only into the same history: the subscriber's position at `from` must be the
        // source's. A writer restored from a backup, or one that lost a tail, has another (or
        // none): a full snapshot.
        if !snapshot && !self.same_history(from, chain).await? {
            tracing::warn!(
                from,
                "the subscriber's history differs from this server's at its revision; sending a full snapshot"
            );
            snapshot = true;
        }
        loop {
            if snapshot {
                (last, epoch) = self.send_snapshot().await?;
                snapshot = false;
            }
            // Catch up to the head known now.
            let head = *head_rx.borrow_and_update();
            if head.epoch != epoch {
                snapshot = true;
                continue;
            }
            while last < head.revision {
                let changes = match feed.after(last, CATCH_UP_STEP) {
                    Some(changes) if !changes.is_empty() => changes,
                    _ => match self.read_log(last, head.revision).await? {
                        Some(changes) => changes,
                        None => {
                            snapshot = true;
                            break;
                        }
                    },
                };
                for change in changes {
                    if change.revision != last + 1 || change.revision > head.revision {
                        break;
                    }
                    let bytes = match &self.namespaces {
                        Some(namespaces) if !namespaces.contains(&change.namespace) => change.empty,
                        _ => change.full,
                    };
                    self.send(Wire::Change(bytes)).await?;
                    last = change.revision;
                    self.guard.sent.store(last, Ordering::Relaxed);
                }
                if feed.head_state().epoch != epoch {
                    snapshot = true;
                    break;
                }
            }
            if snapshot {
                continue;
            }
            self.wait(&mut head_rx, &mut heartbeat, &mut beats).await?;
        }
    }

    /// Waits for the head to move, sending heartbeats meanwhile (on the timer, and whenever the
    /// source asks, as a replica does when it hears its upstream's).
    async fn wait(
        &self,
        head_rx: &mut watch::Receiver<Head>,
        heartbeat: &mut tokio::time::Interval,
        beats: &mut Option<watch::Receiver<u64>>,
    ) -> Result<(), Stop> {
        let mut shutdown = self.service.shutdown.clone();
        let beat = async {
            match beats {
                Some(beats) => beats.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let send_beat = tokio::select! {
            changed = head_rx.changed() => {
                if changed.is_err() {
                    return Err(Stop::Done);
                }
                false
            }
            _ = heartbeat.tick() => true,
            relayed = beat => {
                if !relayed {
                    // The source stopped relaying (it is shutting down): the timer remains.
                    *beats = None;
                }
                relayed
            }
            _ = stopped(&mut shutdown) => return Err(Stop::Done),
            _ = self.tx.closed() => return Err(Stop::Done),
        };
        if send_beat {
            let beat = self.service.source.heartbeat();
            self.send(Wire::Heartbeat(beat.encode_to_vec().into()))
                .await?;
            heartbeat.reset();
        }
        Ok(())
    }

    /// Whether the source's history position at `revision` is `chain`.
    async fn same_history(&self, revision: u64, chain: Vec<u8>) -> Result<bool, Stop> {
        let source = self.service.source.clone();
        match tokio::task::spawn_blocking(move || source.position(revision)).await {
            Ok(Ok(position)) => Ok(!chain.is_empty() && position.as_deref() == Some(&chain[..])),
            Ok(Err(e)) => Err(Stop::Failed(Status::internal(format!(
                "reading the history position: {e}"
            )))),
            Err(e) => Err(Stop::Failed(Status::internal(format!(
                "reading the history position: {e}"
            )))),
        }
    }

    /// Reads the changes after `last` (up to `head`) from the source's log. `None` when they are
    /// gone.
    async fn read_log(&self, last: u64, head: u64) -> Result<Option<Vec<EncodedChange>>, Stop> {
        let source = self.service.source.clone();
        let read = tokio::task::spawn_blocking(move || {
            if last < source.feed().compacted() {
                return Ok::<_, String>(None);
            }
            let changes = source.read_log(last, head, CATCH_UP_STEP)?;
            Ok(changes.filter(|c| c.first().is_some_and(|c| c.revision == last + 1)))
        });
        match read.await {
            Ok(Ok(changes)) => Ok(changes),
            Ok(Err(e)) => Err(Stop::Failed(Status::internal(format!(
                "reading the change log: {e}"
            )))),
            Err(e) => Err(Stop::Failed(Status::internal(format!(
                "reading the change log: {e}"
            )))),
        }
    }

    /// Sends a snapshot of the followed namespaces, shared with the subscribers asking for the
    /// same at about the same time; returns its revision and epoch.
    async fn send_snapshot(&mut self) -> Result<(u64, u64), Stop> {
        let (snapshot, epoch) = self
            .service
            .snapshots
            .get(
                &self.service.source,
                self.namespaces.as_ref(),
                self.service.config.chunk_bytes,
                &self.service.subscribers,
            )
            .await
            .map_err(|e| Stop::Failed(Status::internal(format!("taking a snapshot: {e}"))))?;
        self.send(Wire::SnapshotBegin(snapshot.begin.clone()))
            .await?;
        for chunk in &snapshot.chunks {
            self.send(Wire::SnapshotChunk(chunk.clone())).await?;
        }
        // A snapshot may hold writes that are committed but not yet durable. A subscriber must
        // never hold a revision the writer could still lose in a crash, so the snapshot ends only
        // once its revision is the feed's head or behind it (at most one group-commit flush
        // away); if the writer dies first, the subscriber never sees SnapshotEnd and drops what
        // it received.
        let revision = snapshot.revision;
        drop(snapshot);
        self.durable(revision).await?;
        let end = pb::SnapshotEnd { revision };
        self.send(Wire::SnapshotEnd(end.encode_to_vec().into()))
            .await?;
        self.guard.sent.store(revision, Ordering::Relaxed);
        Ok((revision, epoch))
    }

    /// Waits until `revision` is the feed's head or behind it.
    async fn durable(&self, revision: u64) -> Result<(), Stop> {
        let mut shutdown = self.service.shutdown.clone();
        tokio::select! {
            () = self.service.source.feed().until_durable(revision) => Ok(()),
            _ = stopped(&mut shutdown) => Err(Stop::Done),
        }
    }

    /// Sends one message, giving up when the client is gone or the server shuts down (a slow
    /// client only ever blocks this task).
    async fn send(&self, wire: Wire) -> Result<(), Stop> {
        let mut shutdown = self.service.shutdown.clone();
        tokio::select! {
            sent = self.tx.send(Ok(WireMessage { kind: Some(wire) })) => sent.map_err(|_| Stop::Done),
            _ = stopped(&mut shutdown) => Err(Stop::Done),
        }
    }
}

/// The snapshots being sent, one per namespace selection, shared by the subscribers that ask for
/// the same selection while it is current.
#[derive(Default)]
struct SharedSnapshots {
    slots: Mutex<HashMap<Option<Vec<String>>, Weak<Slot>>>,
    /// Bounds the snapshots built at once.
    builds: BuildPermits,
}

/// One shared snapshot: built once by the first subscriber that needs it; the others wait for
/// it. Lives while a subscriber streams it, and [`SNAPSHOT_LINGER`] after it was built.
struct Slot {
    /// The feed's epoch when the snapshot was asked for; a state from another epoch is never
    /// shared.
    epoch: u64,
    snapshot: OnceCell<Result<Arc<EncodedSnapshot>, String>>,
}

/// A semaphore with [`CONCURRENT_BUILDS`] permits (a `Default` for [`SharedSnapshots`]).
struct BuildPermits(Semaphore);

impl Default for BuildPermits {
    fn default() -> BuildPermits {
        BuildPermits(Semaphore::new(CONCURRENT_BUILDS))
    }
}

impl SharedSnapshots {
    /// A snapshot of `namespaces` (all when `None`) from `source`: the current shared one if
    /// there is one, else a new one; with the epoch it belongs to.
    async fn get<S: Source>(
        &self,
        source: &Arc<S>,
        namespaces: Option<&BTreeSet<String>>,
        chunk_bytes: usize,
        stats: &Subscribers,
    ) -> Result<(Arc<EncodedSnapshot>, u64), String> {
        let key = namespaces.map(|n| n.iter().cloned().collect::<Vec<_>>());
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.retain(|_, slot| slot.strong_count() > 0);
            let feed = source.feed();
            let head = feed.head_state();
            let current = slots.get(&key).and_then(Weak::upgrade).filter(|slot| {
                slot.epoch == head.epoch
                    && match slot.snapshot.get() {
                        // Being built: it will be at the head or past it.
                        None => true,
                        Some(Ok(snapshot)) => {
                            snapshot.revision >= feed.compacted()
                                && head.revision.saturating_sub(snapshot.revision) <= SHARE_WINDOW
                        }
                        Some(Err(_)) => false,
                    }
            });
            match current {
                Some(slot) => slot,
                None => {
                    let slot = Arc::new(Slot {
                        epoch: head.epoch,
                        snapshot: OnceCell::new(),
                    });
                    slots.insert(key, Arc::downgrade(&slot));
                    slot
                }
            }
        };
        let result = slot
            .snapshot
            .get_or_init(|| async {
                let _permit = self.builds.0.acquire().await;
                let source = source.clone();
                let namespaces = namespaces.cloned();
                let built = tokio::task::spawn_blocking(move || {
                    source.snapshot(namespaces.as_ref(), chunk_bytes)
                })
                .await
                .unwrap_or_else(|e| Err(format!("the snapshot task failed: {e}")));
                if built.is_ok() {
                    stats.snapshots_built.fetch_add(1, Ordering::Relaxed);
                    // Keeps the snapshot shareable for a while after it was built; the task
                    // ends after the linger.
                    let linger = slot.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(SNAPSHOT_LINGER).await;
                        drop(linger);
                    });
                }
                built.map(Arc::new)
            })
            .await;
        match result {
            Ok(snapshot) => Ok((snapshot.clone(), slot.epoch)),
            Err(e) => Err(e.clone()),
        }
    }
}

/// Completes once the shutdown flag is set (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here.
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

impl<S, I: Clone> Clone for ReplicationServer<S, I> {
    fn clone(&self) -> Self {
        ReplicationServer {
            inner: self.inner.clone(),
            interceptor: self.interceptor.clone(),
        }
    }
}

impl<S, I> tonic::server::NamedService for ReplicationServer<S, I> {
    const NAME: &'static str = "flagstream.v1.Replication";
}

impl<S, I, B> Service<http::Request<B>> for ReplicationServer<S, I>
where
    S: Source,
    I: tonic::service::Interceptor + Clone + Send + 'static,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let interceptor = self.interceptor.clone();
        match req.uri().path() {
            "/flagstream.v1.Replication/Subscribe" => Box::pin(async move {
                let method = SubscribeSvc { inner, interceptor };
                let codec = tonic_prost::ProstCodec::<WireMessage, pb::SubscribeRequest>::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                Ok(grpc.server_streaming(method, req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("unknown method").into_http()) }),
        }
    }
}

struct SubscribeSvc<S, I> {
    inner: Replication<S>,
    interceptor: I,
}

impl<S: Source, I: tonic::service::Interceptor + Send + 'static>
    tonic::server::ServerStreamingService<pb::SubscribeRequest> for SubscribeSvc<S, I>
{
    type Response = WireMessage;
    type ResponseStream = ReceiverStream<Result<WireMessage, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<pb::SubscribeRequest>) -> Self::Future {
        // The interceptor runs here, on the decoded request's metadata, since this service is
        // not wrapped by `InterceptedService`.
        let (metadata, extensions, message) = request.into_parts();
        let checked = self
            .interceptor
            .call(Request::from_parts(metadata, extensions, ()));
        let inner = self.inner.clone();
        Box::pin(async move {
            let (metadata, extensions, ()) = checked?.into_parts();
            let stream = inner.subscribe(Request::from_parts(metadata, extensions, message))?;
            Ok(Response::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(revision: u64) -> EncodedChange {
        EncodedChange::new(
            &pb::Change {
                revision,
                time: None,
                deltas: vec![pb::Delta::default()],
                chain: vec![revision as u8; 16],
            },
            "ns".into(),
        )
    }

    #[tokio::test]
    async fn waits_for_durability_until_its_limit() {
        let feed = Arc::new(Feed::new(1, 3, 0, 8));
        assert!(
            feed.wait_durable(3, Duration::ZERO).await,
            "already durable"
        );
        assert!(
            !feed.wait_durable(4, Duration::from_millis(20)).await,
            "revision 4 never became durable"
        );
        let waiting = tokio::spawn({
            let feed = feed.clone();
            async move { feed.wait_durable(5, Duration::from_secs(30)).await }
        });
        feed.publish(change(4));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "4 is not 5");
        feed.publish(change(5));
        assert!(waiting.await.unwrap());
    }

    #[test]
    fn a_reset_feed_knows_positions_from_its_base_and_forgets_what_it_drops() {
        let feed = Feed::new(0, 0, 0, 2);
        feed.reset(10, vec![10; 16]);
        assert_eq!(
            feed.head_state(),
            Head {
                epoch: 1,
                revision: 10
            }
        );
        assert_eq!(feed.position(10), Some(vec![10; 16]));
        assert!(feed.after(10, 8).is_none(), "nothing to serve from yet");
        feed.publish(change(11));
        feed.publish(change(12));
        assert_eq!(feed.position(12), Some(vec![12; 16]));
        assert_eq!(feed.after(10, 8).map(|c| c.len()), Some(2));
        feed.publish(change(13));
        assert_eq!(feed.compacted(), 11, "11 left the ring");
        assert_eq!(feed.position(11), Some(vec![11; 16]), "the new base");
        assert_eq!(feed.position(10), None);
        assert!(feed.after(10, 8).is_none(), "11 must come from elsewhere");
        feed.reset(5, vec![5; 16]);
        assert_eq!(
            feed.head_state(),
            Head {
                epoch: 2,
                revision: 5
            }
        );
        assert_eq!(feed.position(12), None, "another history");
    }

    #[test]
    fn chunks_of_encoded_and_decoded_objects_decode_as_snapshot_chunks() {
        let flag = |key: &str| pb::Flag {
            namespace: "ns".into(),
            key: key.into(),
            description: "d".repeat(100),
            ..Default::default()
        };
        let mut chunks = ChunkWriter::new(300);
        chunks.push(
            ChunkField::Namespace,
            &pb::Namespace {
                key: "ns".into(),
                ..Default::default()
            },
        );
        chunks.push_encoded(ChunkField::Flag, &flag("a").encode_to_vec());
        chunks.push(ChunkField::Flag, &flag("b"));
        chunks.push_encoded(ChunkField::Flag, &flag("c").encode_to_vec());
        chunks.push(
            ChunkField::Segment,
            &pb::Segment {
                namespace: "ns".into(),
                key: "s".into(),
                ..Default::default()
            },
        );
        let chunks: Vec<_> = chunks
            .finish()
            .into_iter()
            .map(|c| pb::SnapshotChunk::decode(c).unwrap())
            .collect();
        assert!(
            chunks.len() >= 2,
            "cut at about 300 bytes: {}",
            chunks.len()
        );
        let keys: Vec<_> = chunks
            .iter()
            .flat_map(|c| &c.flags)
            .map(|f| f.key.as_str())
            .collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(
            chunks
                .iter()
                .map(|c| c.namespaces.len() + c.segments.len())
                .sum::<usize>(),
            2
        );
        assert_eq!(
            chunks.iter().flat_map(|c| &c.flags).next(),
            Some(&flag("a"))
        );
    }

    #[test]
    fn a_change_without_deltas_is_its_own_empty_form() {
        let encoded = EncodedChange::new(
            &pb::Change {
                revision: 3,
                time: None,
                deltas: Vec::new(),
                chain: vec![1; 16],
            },
            String::new(),
        );
        assert_eq!(encoded.full, encoded.empty);
        let full = change(4);
        assert!(full.full.len() > full.empty.len());
        let empty = pb::Change::decode(full.empty).unwrap();
        assert_eq!(
            (empty.revision, empty.chain, empty.deltas.len()),
            (4, vec![4; 16], 0)
        );
    }
}
