//! The follower: a background task that subscribes to flagwrite's Replication stream and applies
//! what it receives to the [`State`], reconnecting with jittered exponential backoff.
//!
//! It always resumes from the applied revision (0 before any full state, which makes the writer
//! send a snapshot). A change whose revision is not the applied revision + 1, or any message out
//! of protocol, ends the subscription and the follower subscribes again from the applied
//! revision: it never skips a revision and never publishes half of a change or snapshot.
//!
//! Receiving and applying are split: the task reads the stream's messages, undecoded, and notes
//! the revision each names; a thread of the subscription's own decodes them, converts them and
//! compiles them into the state, in order. None of that CPU work (a 20,000-flag import is one
//! change) runs on the async workers that answer evaluations. The one exception keeps small
//! writes fast: a change of at most [`INLINE_BYTES`] with no regex to compile (compiling one
//! costs milliseconds) is applied by the task itself when the thread has nothing in hand, which
//! spares it two thread wake-ups (microseconds of work; the wake-ups doubled the propagation
//! time to 16 replicas on two cores).
//!
//! Exit: the task returns when the shutdown channel closes (its sender is dropped).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flagstream::pb;
use flagstream::pb::sync_message::Kind;
use prost::Message;
use prost::bytes::{Buf, Bytes};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Endpoint;

use crate::relay::Relay;
use crate::state::{ApplyError, SnapshotBuilder, State};
use crate::wire::{self, WireError};

/// Where and how to follow the writer.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The writer's endpoint (address, TLS, timeouts).
    pub endpoint: Endpoint,
    /// The bearer token of scope `sync`, if the writer requires one.
    pub token: Option<String>,
    /// Reconnection delays.
    pub backoff: Backoff,
    /// How long the writer may send nothing (not even a heartbeat) before the subscription is
    /// considered dead and reopened.
    pub silence: Duration,
}

/// Jittered exponential backoff: the n-th consecutive failure waits a random delay between half
/// and all of `min * 2^n`, capped at `max`, so replicas restarted together do not reconnect in
/// lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub min: Duration,
    /// The largest delay.
    pub max: Duration,
}

/// What the follower knows about the writer, for metrics, logs and health. Written by the
/// follower only; read lock-free by anyone.
pub struct SyncStatus {
    /// The instant `heard_ms` counts from.
    base: Instant,
    /// Milliseconds after `base` when the writer was last heard from (any message); `u64::MAX`
    /// before the first.
    heard_ms: AtomicU64,
    /// The writer's head revision, from heartbeats and changes; a `watch` so that a
    /// `min_revision` call can wait for news of its revision.
    head: watch::Sender<u64>,
    /// Whether a subscription is currently open.
    connected: AtomicBool,
    /// Subscriptions opened, for metrics.
    subscriptions: AtomicU64,
    /// Subscriptions ended because of a gap or a protocol error, for metrics.
    resyncs: AtomicU64,
    /// Snapshots received and applied; a resumed subscription adds none.
    snapshots: AtomicU64,
    /// How long the upstream had not heard from the writer when it sent its last heartbeat, in
    /// milliseconds: 0 from the writer itself; more through a relay (see `relay`). `u64::MAX`
    /// when the upstream has never heard from the writer.
    carried_ms: AtomicU64,
    /// The writer's clock in its last heartbeat, passed on by a relay's heartbeats.
    writer_time: Mutex<Option<prost_types::Timestamp>>,
    /// Counts heartbeats heard; a relay sends one to its followers on each.
    beats: watch::Sender<u64>,
    /// The highest revision named by the current subscription (0 before any), and whether it
    /// has sent a heartbeat: once it has, the writer's head is known as of now, not as of an
    /// older history (see [`SyncStatus::writer_is_behind`]).
    session_head: AtomicU64,
    session_beat: AtomicBool,
    /// The revision the writer sent that this replica cannot decode or apply (0: none). While it
    /// is set the replica serves the revision before it and cannot catch up by itself: logged as
    /// an error on every attempt, exported as a metric, and reported on the `flagread.sync`
    /// health service.
    stuck: watch::Sender<u64>,
}

/// Why a subscription ended.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The writer could not be reached.
    #[error("cannot connect to the writer: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The writer refused the subscription or the stream failed.
    #[error("writer: {0}")]
    Stream(#[from] tonic::Status),
    /// The stream ended (the writer shut down).
    #[error("the writer ended the stream")]
    Ended,
    /// Nothing arrived for longer than the silence limit.
    #[error("the writer sent nothing for {0:?}")]
    Silent(Duration),
    /// A message out of protocol (a chunk outside a snapshot, a change inside one, ...).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A change out of order, or a stale snapshot.
    #[error("{0}")]
    Apply(#[from] ApplyError),
    /// An object that does not convert into the model.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// A message that does not decode.
    #[error("a message from the writer does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 for the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = self
            .min
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        let cap = exp.min(self.max);
        let half = cap / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

impl SyncStatus {
    pub fn new() -> SyncStatus {
        SyncStatus {
            base: Instant::now(),
            heard_ms: AtomicU64::new(u64::MAX),
            head: watch::channel(0).0,
            connected: AtomicBool::new(false),
            subscriptions: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            carried_ms: AtomicU64::new(0),
            writer_time: Mutex::new(None),
            beats: watch::channel(0).0,
            session_head: AtomicU64::new(0),
            session_beat: AtomicBool::new(false),
            stuck: watch::channel(0).0,
        }
    }

    /// The revision this replica cannot apply; 0 when none.
    pub fn stuck(&self) -> u64 {
        *self.stuck.borrow()
    }

    /// Follows [`SyncStatus::stuck`].
    pub fn subscribe_stuck(&self) -> watch::Receiver<u64> {
        self.stuck.subscribe()
    }

    /// Time since the writer was last heard from; `None` if it never was. Through a chain of
    /// replicas: the time since this replica heard its upstream, plus how long the upstream had
    /// not heard from the writer then.
    pub fn staleness(&self) -> Option<Duration> {
        let carried = match self.carried_ms.load(Ordering::Relaxed) {
            u64::MAX => return None,
            ms => Duration::from_millis(ms),
        };
        match self.heard_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(
                Instant::now().saturating_duration_since(self.base + Duration::from_millis(ms))
                    + carried,
            ),
        }
    }

    /// The writer's clock in its last heartbeat heard (directly or relayed).
    pub fn writer_time(&self) -> Option<prost_types::Timestamp> {
        *self.writer_time.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the writer, as the open subscription tells, is behind `revision`: connected,
    /// heard a heartbeat, and nothing it named reached `revision`. A follower of a relay that is
    /// ahead of such a writer holds another history (the writer was restored), not a future.
    pub fn writer_is_behind(&self, revision: u64) -> bool {
        self.connected()
            && self.session_beat.load(Ordering::Relaxed)
            && self.session_head.load(Ordering::Relaxed) < revision
    }

    /// Follows the heartbeats heard: changes on each.
    pub fn subscribe_beats(&self) -> watch::Receiver<u64> {
        self.beats.subscribe()
    }

    /// The writer's head revision as last heard.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Waits until the writer's head, as heard, is at least `revision`. The caller bounds the
    /// wait.
    pub async fn wait_for_head(&self, revision: u64) {
        let mut head = self.head.subscribe();
        // Fails only when the sender is dropped, and `self` owns it.
        let _ = head.wait_for(|head| *head >= revision).await;
    }

    /// Whether a subscription is open.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Subscriptions opened so far.
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Subscriptions ended by a gap or protocol error so far.
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// Snapshots received from the writer and applied so far.
    pub fn snapshots(&self) -> u64 {
        self.snapshots.load(Ordering::Relaxed)
    }

    /// Something was applied: nothing is stuck.
    fn applied(&self) {
        self.stuck
            .send_if_modified(|stuck| std::mem::take(stuck) != 0);
    }

    /// A heartbeat arrived: note how stale the upstream was, and tell a relay to pass it on.
    fn beat(&self, beat: &pb::Heartbeat) {
        self.carried_ms.store(beat.silence_ms, Ordering::Relaxed);
        self.session_beat.store(true, Ordering::Relaxed);
        if beat.time.is_some() {
            *self.writer_time.lock().unwrap_or_else(|e| e.into_inner()) = beat.time;
        }
        self.beats.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn heard(&self, head: u64) {
        let ms = Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64;
        self.heard_ms.store(ms, Ordering::Relaxed);
        self.session_head.fetch_max(head, Ordering::Relaxed);
        self.head.send_if_modified(|heard| {
            let newer = head > *heard;
            if newer {
                *heard = head;
            }
            newer
        });
    }
}

impl Default for SyncStatus {
    fn default() -> SyncStatus {
        SyncStatus::new()
    }
}

/// Follows `upstream` into `state` until `shutdown` closes (its sender is dropped or sends).
pub async fn follow(
    upstream: Upstream,
    state: Arc<State>,
    status: Arc<SyncStatus>,
    relay: Option<Arc<Relay>>,
    mut shutdown: watch::Receiver<()>,
) {
    let mut failures = 0u32;
    let progressed = Arc::new(AtomicBool::new(false));
    let tls = upstream.endpoint.uri().scheme_str() == Some("https");
    loop {
        progressed.store(false, Ordering::Relaxed);
        let opened = status.subscriptions();
        let result = tokio::select! {
            result = subscribe(&upstream, &state, &status, &relay, &progressed) => result,
            _ = shutdown.changed() => break,
        };
        status.connected.store(false, Ordering::Relaxed);
        if progressed.load(Ordering::Relaxed) {
            failures = 0;
        }
        failures += 1;
        let delay = upstream.backoff.delay(failures);
        if let Some(revision) = unappliable(&result, state.revision()) {
            status.stuck.send_replace(revision);
            tracing::error!(
                error = %result,
                revision,
                applied = state.revision(),
                "cannot apply this revision from the writer: serving the revision before it; this replica cannot catch up until the writer sends something it can decode"
            );
        }
        match &result {
            FollowError::Apply(_)
            | FollowError::Protocol(_)
            | FollowError::Wire(_)
            | FollowError::Decode(_) => {
                status.resyncs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %result, applied = state.revision(), ?delay, "resyncing with the writer");
            }
            FollowError::Connect(_)
            | FollowError::Stream(_)
            | FollowError::Ended
            | FollowError::Silent(_) => {
                let refused_at_once = tls && status.subscriptions() == opened;
                if let Some(tls) = tls_failure(&result, refused_at_once) {
                    tracing::error!(
                        error = %tls,
                        applied = state.revision(),
                        ?delay,
                        "TLS with the writer failed (a certificate or handshake problem, not the network): check --upstream-ca, --upstream-cert/--upstream-key and the writer's --tls-client-ca; serving the state held, reconnecting"
                    );
                } else {
                    tracing::warn!(
                    error = %result,
                    applied = state.revision(),
                    head = status.head(),
                    stale_s = status.staleness().map(|s| s.as_secs()),
                    ?delay,
                    "writer unreachable; serving the state held, reconnecting"
                    );
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => break,
        }
    }
    status.connected.store(false, Ordering::Relaxed);
    tracing::debug!("follower stopped");
}

/// The message of a TLS failure that ended a subscription (a handshake refused by either side:
/// no client certificate, an untrusted one, a wrong server name), read down the error's causes;
/// `None` for any other failure. rustls errors reach here only as text (inside `io::Error`s
/// within hyper's), so the causes are matched by what they say.
///
/// In TLS 1.3 a server checks the client's certificate after the client has finished its side
/// of the handshake, so a refused replica may only see its first request fail with the
/// connection closed or a broken pipe, the server's alert unread. `refused_at_once` (a TLS
/// upstream, and no subscription opened on this attempt) lets such a failure count as TLS too.
fn tls_failure(error: &FollowError, refused_at_once: bool) -> Option<String> {
    let mut causes = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = next {
        causes.push(cause.to_string());
        next = cause.source();
    }
    let text = causes.join(": ");
    let lower = text.to_ascii_lowercase();
    if ["certificate", "tls", "handshake", "alert"]
        .iter()
        .any(|word| lower.contains(word))
    {
        return Some(text);
    }
    let closed = ["connection closed", "broken pipe", "connection reset"]
        .iter()
        .any(|words| lower.contains(words));
    (refused_at_once && closed).then(|| {
        format!(
            "the writer closed the TLS connection right after the handshake, as it does to a client certificate it refuses or misses ({text})"
        )
    })
}

/// The revision a failed subscription could not apply, if that is why it failed: an object that
/// does not convert into the model, or a message the client could not decode (the one after the
/// applied revision, since nothing of it was applied).
fn unappliable(error: &FollowError, applied: u64) -> Option<u64> {
    match error {
        FollowError::Wire(WireError::Convert { revision, .. }) => Some(*revision),
        FollowError::Decode(_) => Some(applied + 1),
        _ => None,
    }
}

/// Messages received and not yet applied, at most: the reader waits for the apply thread
/// beyond this (snapshot chunks are up to about 1 MiB each).
const APPLY_QUEUE: usize = 16;

/// The Subscribe method, called without generated code so that messages arrive undecoded.
const SUBSCRIBE_PATH: &str = "/flagstream.v1.Replication/Subscribe";

/// One subscription: opens the stream from the applied revision and hands what arrives to an
/// apply thread until either fails; returns once the thread has applied everything received,
/// so the next subscription resumes from the right revision. Sets `progressed` once anything
/// was applied, so that backoff starts over.
async fn subscribe(
    upstream: &Upstream,
    state: &Arc<State>,
    status: &Arc<SyncStatus>,
    relay: &Option<Arc<Relay>>,
    progressed: &Arc<AtomicBool>,
) -> FollowError {
    let (messages, received) = mpsc::channel(APPLY_QUEUE);
    let (done, mut finished) = oneshot::channel();
    let busy = Arc::new(AtomicUsize::new(0));
    let spawned = std::thread::Builder::new()
        .name("flagread-apply".into())
        .spawn({
            let (state, status, progressed) = (state.clone(), status.clone(), progressed.clone());
            let (busy, relay) = (busy.clone(), relay.clone());
            move || {
                let relay = relay.as_deref();
                let _ = done.send(apply_all(
                    received,
                    &busy,
                    &state,
                    &status,
                    relay,
                    &progressed,
                ));
            }
        });
    if let Err(error) = spawned {
        return FollowError::Protocol(format!("cannot start the apply thread: {error}"));
    }
    let applier = Applier {
        messages,
        busy,
        in_snapshot: false,
        relay: relay.clone(),
    };
    let ended = tokio::select! {
        ended = receive(upstream, state, status, progressed, applier) => ended,
        // The thread ends early only when it cannot apply something.
        failed = &mut finished => return failed.unwrap_or(FollowError::Ended),
    };
    // What was received is applied before the next subscription; a failure to apply it is the
    // more telling error.
    match finished.await {
        Ok(FollowError::Ended) | Err(_) => ended,
        Ok(failed) => failed,
    }
}

/// A change applied by the receiving task itself (when light): at most this many bytes encoded.
pub const INLINE_BYTES: usize = 16 * 1024;

/// What the apply thread is given: a message as received, or one the task decoded to see
/// whether it could apply it itself.
enum Work {
    Raw(Bytes),
    Decoded(pb::SyncMessage),
}

/// The receiving task's side of the apply thread.
struct Applier {
    messages: mpsc::Sender<Work>,
    /// Messages handed to the thread and not yet applied.
    busy: Arc<AtomicUsize>,
    /// Between a `SnapshotBegin` and its `SnapshotEnd` as received: the thread holds a snapshot
    /// being built, so nothing is applied beside it.
    in_snapshot: bool,
    /// Where applied changes are passed on to followers, when this replica serves them.
    relay: Option<Arc<Relay>>,
}

impl Applier {
    /// Applies `message` here if it is a light change and the thread has nothing in hand,
    /// otherwise hands it to the thread. `Err` when it cannot be applied, or the thread has
    /// stopped (`Ended`; it says why).
    async fn take(
        &mut self,
        message: Bytes,
        state: &State,
        status: &SyncStatus,
        progressed: &AtomicBool,
    ) -> Result<(), FollowError> {
        let kind = message.first().map(|key| key >> 3);
        match kind {
            Some(1) => self.in_snapshot = true,
            Some(3) => self.in_snapshot = false,
            _ => {}
        }
        if kind == Some(5) {
            // A heartbeat names the head, already noted, and how stale the upstream is.
            if let Some(Kind::Heartbeat(beat)) = pb::SyncMessage::decode(message)?.kind {
                status.beat(&beat);
            }
            return Ok(());
        }
        let idle = !self.in_snapshot && self.busy.load(Ordering::Acquire) == 0;
        let work = if idle && kind == Some(4) && message.len() <= INLINE_BYTES {
            let decoded = pb::SyncMessage::decode(message)?;
            if is_light(&decoded) {
                handle(
                    decoded,
                    state,
                    status,
                    self.relay.as_deref(),
                    &mut None,
                    progressed,
                )?;
                return Ok(());
            }
            Work::Decoded(decoded)
        } else {
            Work::Raw(message)
        };
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.messages
            .send(work)
            .await
            .map_err(|_| FollowError::Ended)
    }
}

/// Whether a change is cheap enough to apply on an async worker: it compiles no regex (the rest
/// of a small change compiles in microseconds).
fn is_light(message: &pb::SyncMessage) -> bool {
    let Some(Kind::Change(change)) = &message.kind else {
        return false;
    };
    let regex = |constraints: &[pb::Constraint]| {
        constraints
            .iter()
            .any(|c| c.operator == pb::Operator::Regex as i32)
    };
    change.deltas.iter().all(|delta| match &delta.kind {
        Some(pb::delta::Kind::PutFlag(flag)) => !flag.rules.iter().any(|r| regex(&r.constraints)),
        Some(pb::delta::Kind::PutSegment(segment)) => !regex(&segment.constraints),
        _ => true,
    })
}

/// Opens the stream and passes its messages to `applier` until the stream fails or a message
/// cannot be applied.
async fn receive(
    upstream: &Upstream,
    state: &Arc<State>,
    status: &SyncStatus,
    progressed: &AtomicBool,
    mut applier: Applier,
) -> FollowError {
    // Opening the subscription is bounded by the silence limit too: a connection that lands on
    // a dead path (half-open, or a listener that accepts and never answers) is given up as soon
    // as a silent stream would be, not after HTTP/2 keepalive notices.
    let channel = match tokio::time::timeout(upstream.silence, upstream.endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(error)) => return error.into(),
        Err(_) => return FollowError::Silent(upstream.silence),
    };
    let (from_revision, chain) = {
        let replica = state.load();
        if replica.ready {
            (replica.revision, replica.history.chain.clone())
        } else {
            (0, Vec::new())
        }
    };
    let mut request = tonic::Request::new(pb::SubscribeRequest {
        from_revision,
        namespaces: state.followed(),
        chain,
    });
    if let Some(token) = &upstream.token {
        match format!("Bearer {token}").parse() {
            Ok(value) => {
                request.metadata_mut().insert("authorization", value);
            }
            Err(_) => return FollowError::Protocol("the sync token is not valid metadata".into()),
        }
    }
    let mut client = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    let opened = async {
        client
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("the connection is not ready: {e}")))?;
        client
            .server_streaming(
                request,
                tonic::codegen::http::uri::PathAndQuery::from_static(SUBSCRIBE_PATH),
                RawCodec,
            )
            .await
    };
    let mut stream = match tokio::time::timeout(upstream.silence, opened).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return status.into(),
        Err(_) => return FollowError::Silent(upstream.silence),
    };
    status.session_head.store(0, Ordering::Relaxed);
    status.session_beat.store(false, Ordering::Relaxed);
    status.connected.store(true, Ordering::Relaxed);
    status.subscriptions.fetch_add(1, Ordering::Relaxed);
    tracing::info!(from_revision, "subscribed to the writer");
    loop {
        let message = match tokio::time::timeout(upstream.silence, stream.message()).await {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => return FollowError::Ended,
            Ok(Err(status)) => return status.into(),
            Err(_) => return FollowError::Silent(upstream.silence),
        };
        // The writer's head is known as soon as a message names it, before it is applied: a
        // `min_revision` call for it waits for it instead of being refused as beyond the head.
        status.heard(named_revision(&message).unwrap_or(0));
        if let Err(error) = applier.take(message, state, status, progressed).await {
            return error;
        }
    }
}

/// Applies the messages of one subscription in order, on the calling (apply) thread, until the
/// channel closes (`Ended`) or one cannot be applied.
fn apply_all(
    mut received: mpsc::Receiver<Work>,
    busy: &AtomicUsize,
    state: &State,
    status: &SyncStatus,
    relay: Option<&Relay>,
    progressed: &AtomicBool,
) -> FollowError {
    let mut snapshot: Option<SnapshotBuilder> = None;
    while let Some(work) = received.blocking_recv() {
        let message = match work {
            Work::Decoded(message) => message,
            Work::Raw(bytes) => match pb::SyncMessage::decode(bytes) {
                Ok(message) => message,
                Err(error) => return error.into(),
            },
        };
        match handle(message, state, status, relay, &mut snapshot, progressed) {
            Ok(None) => {}
            Ok(Some(done)) => {
                let (revision, flags) = (done.revision, done.flags.len());
                let chain = done.history.chain.clone();
                state.install(done);
                if let Some(relay) = relay {
                    relay.installed(revision, chain);
                }
                status.snapshots.fetch_add(1, Ordering::Relaxed);
                status.applied();
                progressed.store(true, Ordering::Relaxed);
                tracing::info!(revision, flags, "snapshot applied");
            }
            Err(error) => return error,
        }
        // Only now, with a snapshot installed too, may the receiving task apply on its own.
        busy.fetch_sub(1, Ordering::AcqRel);
    }
    FollowError::Ended
}

/// The revision a stream message names, read without decoding it: field 1 of the message inside
/// `SnapshotBegin`, `SnapshotEnd`, `Change` and `Heartbeat` (their revision or head revision).
/// `None` for a chunk or anything unexpected; decoding proper happens on the apply thread.
fn named_revision(mut message: &[u8]) -> Option<u64> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    let (field, wire_type) = decode_key(&mut message).ok()?;
    if !matches!(field, 1 | 3..=5) || wire_type != WireType::LengthDelimited {
        return None;
    }
    let len = usize::try_from(decode_varint(&mut message).ok()?).ok()?;
    let mut inner = message.get(..len)?;
    if inner.is_empty() {
        return Some(0);
    }
    // prost writes fields in number order, so a non-zero field 1 comes first.
    match decode_key(&mut inner).ok()? {
        (1, WireType::Varint) => decode_varint(&mut inner).ok(),
        _ => Some(0),
    }
}

/// Encodes the subscription request with prost and passes the stream's messages on as they
/// came, undecoded.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

#[derive(Debug)]
struct RequestEncoder;

#[derive(Debug)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = pb::SubscribeRequest;
    type Decode = Bytes;
    type Encoder = RequestEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RequestEncoder {
        RequestEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RequestEncoder {
    type Item = pb::SubscribeRequest;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: pb::SubscribeRequest,
        buf: &mut EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        item.encode(buf)
            .map_err(|e| tonic::Status::internal(format!("encoding the subscription: {e}")))
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// Applies one message of the stream; returns a snapshot once it is complete, for the caller to
/// install.
fn handle(
    message: pb::SyncMessage,
    state: &State,
    status: &SyncStatus,
    relay: Option<&Relay>,
    snapshot: &mut Option<SnapshotBuilder>,
    progressed: &AtomicBool,
) -> Result<Option<SnapshotBuilder>, FollowError> {
    let protocol = |what: &str| Err(FollowError::Protocol(what.to_string()));
    match message.kind {
        None => return protocol("an empty message"),
        Some(Kind::Heartbeat(beat)) => {
            status.heard(beat.head_revision);
            status.beat(&beat);
        }
        Some(Kind::SnapshotBegin(begin)) => {
            status.heard(begin.revision);
            if snapshot.is_some() {
                return protocol("a snapshot began inside another");
            }
            tracing::info!(revision = begin.revision, history = %begin.history_id, "receiving a snapshot");
            *snapshot = Some(wire::begun(begin));
        }
        Some(Kind::SnapshotChunk(chunk)) => {
            status.heard(0);
            let Some(building) = snapshot.as_mut() else {
                return protocol("a snapshot chunk outside a snapshot");
            };
            wire::add_chunk(building, chunk)?;
        }
        Some(Kind::SnapshotEnd(end)) => {
            status.heard(end.revision);
            let Some(done) = snapshot.take() else {
                return protocol("a snapshot end outside a snapshot");
            };
            if done.revision != end.revision {
                return protocol("a snapshot ended at another revision than it began");
            }
            return Ok(Some(done));
        }
        Some(Kind::Change(change)) => {
            status.heard(change.revision);
            if snapshot.is_some() {
                return protocol("a change inside a snapshot");
            }
            let revision = change.revision;
            // Encoded for followers before it is converted; passed on only once applied.
            let relayed = relay.map(|_| Relay::encode(&change));
            state.apply_change(wire::change(change)?)?;
            if let (Some(relay), Some(relayed)) = (relay, relayed) {
                relay.applied(relayed);
            }
            status.applied();
            progressed.store(true, Ordering::Relaxed);
            tracing::debug!(revision, "change applied");
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let backoff = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let check = |failures: u32, low_ms: u64, high_ms: u64| {
            for _ in 0..200 {
                let delay = backoff.delay(failures);
                assert!(
                    delay >= Duration::from_millis(low_ms)
                        && delay <= Duration::from_millis(high_ms),
                    "failure {failures}: {delay:?} not in {low_ms}..={high_ms} ms"
                );
            }
        };
        check(1, 50, 100);
        check(2, 100, 200);
        check(3, 200, 400);
        check(5, 800, 1600);
        check(6, 1000, 2000);
        check(40, 1000, 2000);
    }

    #[test]
    fn the_revision_a_message_names_is_read_without_decoding_it() {
        let encode = |kind: Kind| pb::SyncMessage { kind: Some(kind) }.encode_to_vec();
        let change = encode(Kind::Change(pb::Change {
            revision: 300_000,
            deltas: vec![pb::Delta::default(); 3],
            chain: vec![7; 16],
            time: None,
        }));
        assert_eq!(named_revision(&change), Some(300_000));
        let beat = encode(Kind::Heartbeat(pb::Heartbeat {
            head_revision: u64::MAX,
            time: None,
            history_id: "h".into(),
            silence_ms: 0,
        }));
        assert_eq!(named_revision(&beat), Some(u64::MAX));
        let begin = encode(Kind::SnapshotBegin(pb::SnapshotBegin {
            revision: 9,
            ..Default::default()
        }));
        assert_eq!(named_revision(&begin), Some(9));
        let end = encode(Kind::SnapshotEnd(pb::SnapshotEnd { revision: 9 }));
        assert_eq!(named_revision(&end), Some(9));
        let chunk = encode(Kind::SnapshotChunk(pb::SnapshotChunk::default()));
        assert_eq!(named_revision(&chunk), None);
        assert_eq!(
            named_revision(&encode(Kind::SnapshotEnd(pb::SnapshotEnd { revision: 0 }))),
            Some(0)
        );
        assert_eq!(named_revision(&[0xff, 0xff]), None);
        assert_eq!(named_revision(&change[..4]), None, "cut short");
    }

    #[tokio::test(start_paused = true)]
    async fn staleness_counts_from_the_last_message() {
        let status = SyncStatus::new();
        assert_eq!(status.staleness(), None, "never heard from");
        status.heard(12);
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(status.staleness(), Some(Duration::from_secs(7)));
        status.heard(3);
        assert_eq!(status.head(), 12, "the head never goes back");
        assert_eq!(status.staleness(), Some(Duration::ZERO));
    }
}
