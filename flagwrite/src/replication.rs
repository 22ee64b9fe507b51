//! The Replication service: the change stream replicas follow.
//!
//! # Design
//! - In memory: the [`Feed`] — the last few thousand changes, each encoded
//!   once as a `Change`, plus a `watch` of the durable head revision.
//! - On disk: the change log (retained by count) and the objects.
//! - Per subscriber: one task and one bounded `mpsc` channel. The task sends
//!   a snapshot if the subscriber's revision is 0, compacted away or ahead of
//!   the head; then changes from the ring while it holds the next revision,
//!   otherwise from the change log on disk; then waits for the head to move,
//!   sending a heartbeat every few seconds. If the subscriber's next revision
//!   has been compacted away meanwhile, it gets a fresh snapshot.
//! - The writer only appends to the ring and bumps the watch: a slow
//!   subscriber blocks nothing but its own task.
//!
//! Changes are served pre-encoded: the stream's messages are [`WireMessage`],
//! a hand-written prost message with the same field numbers as
//! `pb::SyncMessage` whose variants hold encoded bytes, so the shared bytes
//! are copied into each response frame, never re-encoded.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use flagstream::kit::auth;
use flagstream::pb;
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::{Request, Response, Status};

use crate::feed::{EncodedChange, Feed, encode};
use crate::metrics::Metrics;
use crate::store::{Snapshot, Store};

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

/// Settings of the stream.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Time between heartbeats.
    pub heartbeat: Duration,
    /// Target size of one snapshot chunk, in encoded bytes.
    pub chunk_bytes: usize,
}

/// The Replication service.
#[derive(Clone)]
pub struct Replication {
    store: Store,
    feed: Arc<Feed>,
    metrics: Arc<Metrics>,
    config: StreamConfig,
    /// Becomes true at shutdown; every subscriber task then ends its stream.
    shutdown: watch::Receiver<bool>,
}

/// The tonic service for [`Replication`] (generated code's shape, with the
/// pre-encoded message type).
#[derive(Clone)]
pub struct ReplicationServer<I> {
    inner: Replication,
    interceptor: I,
}

/// Messages sent per step when catching up, between checks for shutdown.
const CATCH_UP_STEP: usize = 256;

impl Replication {
    pub fn new(
        store: Store,
        feed: Arc<Feed>,
        metrics: Arc<Metrics>,
        config: StreamConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Replication {
        Replication {
            store,
            feed,
            metrics,
            config,
            shutdown,
        }
    }

    /// The tonic service, authenticating with `interceptor`.
    pub fn into_server<I>(self, interceptor: I) -> ReplicationServer<I> {
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
        let (tx, rx) = mpsc::channel(16);
        let follower = Follower {
            service: self.clone(),
            filter: if request.namespaces.is_empty() {
                None
            } else {
                Some(request.namespaces.into_iter().collect())
            },
            tx,
            guard: self.metrics.subscriber(),
        };
        tracing::info!(subscriber = %identity.name, from = request.from_revision, "subscriber connected");
        // The task ends when the client goes away (send fails or the channel
        // closes), at shutdown, or when the writer is gone.
        tokio::spawn(follower.run(request.from_revision, request.chain));
        Ok(ReceiverStream::new(rx))
    }
}

struct Follower {
    service: Replication,
    /// Followed namespaces; `None` for all.
    filter: Option<HashSet<String>>,
    tx: mpsc::Sender<Result<WireMessage, Status>>,
    guard: crate::metrics::SubscriberGuard,
}

/// Why a follower stops.
enum Stop {
    /// The client went away or the server is shutting down.
    Done,
    /// The store failed; the stream ends with this status.
    Failed(Status),
}

impl Follower {
    async fn run(mut self, from: u64, chain: Vec<u8>) {
        if let Err(Stop::Failed(status)) = self.follow(from, chain).await {
            tracing::warn!(%status, "subscriber stream failed");
            let _ = self.tx.send(Err(status)).await;
        }
    }

    async fn follow(&mut self, from: u64, chain: Vec<u8>) -> Result<(), Stop> {
        let feed = self.service.feed.clone();
        let mut head_rx = feed.subscribe_head();
        let mut heartbeat = tokio::time::interval(self.service.config.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let mut last = from;
        let mut snapshot = from == 0 || from < feed.compacted() || from > feed.head();
        // Resume only into the same history: the subscriber's position at
        // `from` must be the store's. A writer restored from a backup, or
        // one that lost a tail, has another (or none): a full snapshot.
        if !snapshot && !self.same_history(from, chain).await? {
            tracing::warn!(
                from,
                "the subscriber's history differs from the store's at its revision; sending a full snapshot"
            );
            snapshot = true;
        }
        loop {
            if snapshot {
                last = self.send_snapshot().await?;
                snapshot = false;
            }
            // Catch up to the head known now.
            let head = *head_rx.borrow_and_update();
            while last < head {
                let changes = match feed.after(last, CATCH_UP_STEP) {
                    Some(changes) if !changes.is_empty() => changes,
                    _ => match self.read_log(last, head).await? {
                        Some(changes) => changes,
                        None => {
                            snapshot = true;
                            break;
                        }
                    },
                };
                for change in changes {
                    if change.revision != last + 1 || change.revision > head {
                        break;
                    }
                    let bytes = match &self.filter {
                        Some(filter) if !filter.contains(&change.namespace) => change.empty,
                        _ => change.full,
                    };
                    self.send(Wire::Change(bytes)).await?;
                    last = change.revision;
                    self.guard.sent.store(last, Ordering::Relaxed);
                }
            }
            if snapshot {
                continue;
            }
            let mut shutdown = self.service.shutdown.clone();
            tokio::select! {
                changed = head_rx.changed() => if changed.is_err() { return Err(Stop::Done) },
                _ = heartbeat.tick() => {
                    let beat = pb::Heartbeat {
                        head_revision: feed.head(),
                        time: Some(SystemTime::now().into()),
                        history_id: self.service.store.history_id().to_string(),
                    };
                    self.send(Wire::Heartbeat(beat.encode_to_vec().into())).await?;
                }
                _ = stopped(&mut shutdown) => return Err(Stop::Done),
                _ = self.tx.closed() => return Err(Stop::Done),
            }
        }
    }

    /// Whether the store's history position at `revision` is `chain`.
    async fn same_history(&self, revision: u64, chain: Vec<u8>) -> Result<bool, Stop> {
        let store = self.service.store.clone();
        match tokio::task::spawn_blocking(move || store.position(revision)).await {
            Ok(Ok(position)) => Ok(!chain.is_empty() && position.as_deref() == Some(&chain[..])),
            Ok(Err(e)) => Err(Stop::Failed(Status::internal(format!(
                "reading the history position: {e}"
            )))),
            Err(e) => Err(Stop::Failed(Status::internal(format!(
                "reading the history position: {e}"
            )))),
        }
    }

    /// Reads the changes after `last` (up to `head`) from the change log.
    /// `None` when they were compacted away.
    async fn read_log(&self, last: u64, head: u64) -> Result<Option<Vec<EncodedChange>>, Stop> {
        let store = self.service.store.clone();
        let feed = self.service.feed.clone();
        let read = tokio::task::spawn_blocking(move || {
            if last < feed.compacted() {
                return Ok::<_, crate::store::StoreError>(None);
            }
            let mut out = Vec::new();
            for record in store.log_after(last).take(CATCH_UP_STEP) {
                let record = record?;
                if record.revision > head {
                    break;
                }
                out.push(encode(record));
            }
            if out.first().is_none_or(|c| c.revision != last + 1) {
                return Ok(None);
            }
            Ok(Some(out))
        });
        match read.await {
            Ok(Ok(changes)) => Ok(changes),
            Ok(Err(e)) => Err(Stop::Failed(Status::internal(format!(
                "reading the change log: {}",
                e
            )))),
            Err(e) => Err(Stop::Failed(Status::internal(format!(
                "reading the change log: {e}"
            )))),
        }
    }

    /// Sends a snapshot of the followed namespaces; returns its revision.
    async fn send_snapshot(&mut self) -> Result<u64, Stop> {
        let store = self.service.store.clone();
        let filter = self.filter.clone();
        let limit = self.service.config.chunk_bytes;
        // Reading every object and encoding the chunks is heavy (seconds for
        // a large store): it runs on the blocking pool, not on a worker.
        let taken = tokio::task::spawn_blocking(move || {
            store
                .snapshot()
                .map(|snapshot| encode_snapshot(snapshot, filter.as_ref(), limit))
        })
        .await;
        let (begin, chunks) = match taken {
            Ok(Ok(encoded)) => encoded,
            Ok(Err(e)) => {
                return Err(Stop::Failed(Status::internal(format!(
                    "taking a snapshot: {e}"
                ))));
            }
            Err(e) => {
                return Err(Stop::Failed(Status::internal(format!(
                    "taking a snapshot: {e}"
                ))));
            }
        };
        let revision = begin.revision;
        let begin = pb::SnapshotBegin {
            history_id: self.service.store.history_id().to_string(),
            ..begin
        };
        self.send(Wire::SnapshotBegin(begin.encode_to_vec().into()))
            .await?;
        for chunk in chunks {
            self.send(Wire::SnapshotChunk(chunk.into())).await?;
        }
        // The copy may hold writes that are committed but not yet flushed. A
        // replica must never hold a revision the writer could still lose in a
        // crash, so the snapshot ends only once its revision is durable (at
        // most one group-commit flush away); if the writer dies first, the
        // replica never sees SnapshotEnd and drops what it received.
        self.durable(revision).await?;
        let end = pb::SnapshotEnd { revision };
        self.send(Wire::SnapshotEnd(end.encode_to_vec().into()))
            .await?;
        self.guard.sent.store(revision, Ordering::Relaxed);
        Ok(revision)
    }

    /// Waits until `revision` is durable (published to the feed's head).
    async fn durable(&self, revision: u64) -> Result<(), Stop> {
        let mut shutdown = self.service.shutdown.clone();
        tokio::select! {
            () = self.service.feed.until_durable(revision) => Ok(()),
            _ = stopped(&mut shutdown) => Err(Stop::Done),
        }
    }

    /// Sends one message, giving up when the client is gone or the server
    /// shuts down (a slow client only ever blocks this task).
    async fn send(&self, wire: Wire) -> Result<(), Stop> {
        let mut shutdown = self.service.shutdown.clone();
        tokio::select! {
            sent = self.tx.send(Ok(WireMessage { kind: Some(wire) })) => sent.map_err(|_| Stop::Done),
            _ = stopped(&mut shutdown) => Err(Stop::Done),
        }
    }
}

/// A snapshot's `SnapshotBegin` (without the history identity) and its
/// chunks, encoded, of the namespaces in `filter` (all when `None`), each
/// chunk about `limit` encoded bytes.
fn encode_snapshot(
    snapshot: Snapshot,
    filter: Option<&HashSet<String>>,
    limit: usize,
) -> (pb::SnapshotBegin, Vec<Vec<u8>>) {
    let follows = |ns: &str| filter.is_none_or(|f| f.contains(ns));
    let mut namespaces: Vec<String> = filter.into_iter().flatten().cloned().collect();
    namespaces.sort();
    let begin = pb::SnapshotBegin {
        revision: snapshot.revision,
        history_id: String::new(),
        chain: snapshot.chain,
        namespaces,
    };
    let mut chunk = pb::SnapshotChunk::default();
    let mut size = 0;
    let mut chunks = Vec::new();
    let mut add = |chunk: &mut pb::SnapshotChunk, len: usize| {
        size += len + 4;
        if size >= limit {
            chunks.push(std::mem::take(chunk).encode_to_vec());
            size = 0;
        }
    };
    for ns in snapshot.namespaces.into_iter().filter(|n| follows(&n.key)) {
        let len = ns.encoded_len();
        chunk.namespaces.push(ns);
        add(&mut chunk, len);
    }
    for segment in snapshot
        .segments
        .into_iter()
        .filter(|s| follows(&s.namespace))
    {
        let len = segment.encoded_len();
        chunk.segments.push(segment);
        add(&mut chunk, len);
    }
    for flag in snapshot.flags.into_iter().filter(|f| follows(&f.namespace)) {
        let len = flag.encoded_len();
        chunk.flags.push(flag);
        add(&mut chunk, len);
    }
    if chunk != pb::SnapshotChunk::default() {
        chunks.push(chunk.encode_to_vec());
    }
    (begin, chunks)
}

/// Completes once the shutdown flag is set (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here.
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

impl<I> tonic::server::NamedService for ReplicationServer<I> {
    const NAME: &'static str = "flagstream.v1.Replication";
}

impl<I, B> Service<http::Request<B>> for ReplicationServer<I>
where
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

struct SubscribeSvc<I> {
    inner: Replication,
    interceptor: I,
}

impl<I: tonic::service::Interceptor + Send + 'static>
    tonic::server::ServerStreamingService<pb::SubscribeRequest> for SubscribeSvc<I>
{
    type Response = WireMessage;
    type ResponseStream = ReceiverStream<Result<WireMessage, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<pb::SubscribeRequest>) -> Self::Future {
        // The interceptor runs here, on the decoded request's metadata, since
        // this service is not wrapped by `InterceptedService`.
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
