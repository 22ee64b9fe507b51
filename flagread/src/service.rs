//! The FlagEval gRPC service: evaluates flags from the published replica state, waits for
//! `min_revision` within the call's deadline, and streams applied changes to `Watch` clients.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagstream::engine::{self, CompiledFlag, Evaluation};
use flagstream::kit::auth;
use flagstream::pb;
use flagstream::pb::flag_eval_server::FlagEval;
use flagstream::validate::shown;
use flagstream::{convert, validate};
use tokio::sync::{Semaphore, SemaphorePermit, broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::follower::SyncStatus;
use crate::holds::{Hold, Holds, Refused};
use crate::metrics::Metrics;
use crate::state::{Applied, FlagExtras, NamespaceState, Replica, State};

/// The longest `min_revision` wait when the call has no deadline, as eval.proto documents.
pub const MAX_REVISION_WAIT: Duration = Duration::from_secs(30);

/// Events a `Watch` subscriber may have queued before the replica stops waiting for it and the
/// subscriber gets a full-refresh event instead.
const WATCH_QUEUE: usize = 64;

/// What a replica lets its callers hold; eval.proto and the README's limits table document
/// them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Unary calls evaluating at once; more are refused with RESOURCE_EXHAUSTED.
    pub concurrency: usize,
    /// `min_revision` waits open at once on the replica.
    pub revision_waits: usize,
    /// `min_revision` waits open at once per token.
    pub revision_waits_per_token: usize,
    /// How long a `min_revision` beyond the writer's head, as this replica last heard it, waits
    /// to hear of it before it is refused with OUT_OF_RANGE.
    pub revision_horizon: Duration,
    /// `Watch` streams open at once on the replica.
    pub watch_streams: usize,
    /// `Watch` streams open at once per token.
    pub watch_streams_per_token: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            concurrency: 10_000,
            revision_waits: 10_000,
            revision_waits_per_token: 1_000,
            revision_horizon: Duration::from_secs(1),
            watch_streams: 10_000,
            watch_streams_per_token: 1_000,
        }
    }
}

/// The FlagEval implementation.
#[derive(Clone)]
pub struct EvalService {
    /// The replica state evaluated.
    state: Arc<State>,
    /// The follower's view of the writer: its head revision as last heard.
    status: Arc<SyncStatus>,
    /// Latency histogram and shed counter.
    metrics: Arc<Metrics>,
    /// Permits for unary calls in flight; when none is left a call is refused at once with
    /// RESOURCE_EXHAUSTED rather than queued, so an overloaded replica sheds load to its peers.
    inflight: Arc<Semaphore>,
    /// The concurrency limit, for the refusal message.
    limit: usize,
    /// `min_revision` waits open, bounded per replica and per token; they hold no permit.
    revision_waits: Arc<Holds>,
    /// `Watch` streams open, bounded per replica and per token.
    watch_streams: Arc<Holds>,
    /// See [`Limits::revision_horizon`].
    horizon: Duration,
    /// Closes at shutdown, ending every `Watch` stream so the server can drain.
    shutdown: watch::Receiver<()>,
}

/// Why a FlagEval call failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The namespace is not held by this replica.
    #[error("namespace {} not found", shown(.0))]
    NamespaceNotFound(String),
    /// The flag does not exist in the namespace.
    #[error("flag {} not found in namespace {}", shown(flag), shown(namespace))]
    FlagNotFound { namespace: String, flag: String },
    /// `expected_type` is not the flag's type.
    #[error("flag {} is of type {actual}, not {expected}", shown(flag))]
    TypeMismatch {
        flag: String,
        actual: &'static str,
        expected: &'static str,
    },
    /// `expected_type` is not a known type.
    #[error("expected_type: unknown flag type {0}")]
    UnknownType(i32),
    /// A request limit was exceeded; names the limit.
    #[error("{field}: {detail} (limit {limit})")]
    Limit {
        field: String,
        detail: String,
        limit: usize,
    },
    /// The context exceeds a documented limit; the message names the field and the limit.
    #[error("{0}")]
    Context(validate::FieldError),
    /// `min_revision` was not reached before the deadline.
    #[error("revision {wanted} not applied yet: this replica has applied revision {applied}")]
    RevisionNotReached { wanted: u64, applied: u64 },
    /// `min_revision` is beyond the writer's head as this replica knows it, and no news of it
    /// came within the horizon.
    #[error(
        "min_revision: revision {wanted} is beyond the writer's head revision {head} as this replica last heard it (waited {horizon:?} for news of it)"
    )]
    RevisionBeyondHead {
        wanted: u64,
        head: u64,
        horizon: Duration,
    },
    /// A bound on what callers hold is reached.
    #[error("{0}")]
    Held(#[from] Refused),
    /// No full state is held yet (the replica is starting).
    #[error("this replica holds no full state yet (applied revision {0})")]
    NotReady(u64),
    /// Too many calls in flight.
    #[error("too many calls in flight (limit {0}); retry on another replica or later")]
    Overloaded(usize),
}

impl From<EvalError> for Status {
    fn from(error: EvalError) -> Status {
        let message = error.to_string();
        match error {
            EvalError::NamespaceNotFound(_) | EvalError::FlagNotFound { .. } => {
                Status::not_found(message)
            }
            EvalError::TypeMismatch { .. }
            | EvalError::UnknownType(_)
            | EvalError::Limit { .. }
            | EvalError::Context(_) => Status::invalid_argument(message),
            EvalError::RevisionNotReached { .. } | EvalError::NotReady(_) => {
                Status::unavailable(message)
            }
            EvalError::RevisionBeyondHead { .. } => Status::out_of_range(message),
            EvalError::Overloaded(_) | EvalError::Held(_) => Status::resource_exhausted(message),
        }
    }
}

type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

impl EvalService {
    /// A service evaluating `state`, followed under `status`, within `limits`.
    pub fn new(
        state: Arc<State>,
        status: Arc<SyncStatus>,
        metrics: Arc<Metrics>,
        limits: Limits,
        shutdown: watch::Receiver<()>,
    ) -> EvalService {
        let limit = limits.concurrency.max(1);
        EvalService {
            state,
            status,
            metrics: metrics.clone(),
            inflight: Arc::new(Semaphore::new(limit)),
            limit,
            revision_waits: Holds::new(
                "min_revision waits",
                limits.revision_waits.max(1),
                limits.revision_waits_per_token.max(1),
                metrics.revision_waits.clone(),
                metrics.revision_waits_refused.clone(),
            ),
            watch_streams: Holds::new(
                "Watch streams",
                limits.watch_streams.max(1),
                limits.watch_streams_per_token.max(1),
                metrics.watch_streams.clone(),
                metrics.watch_streams_refused.clone(),
            ),
            horizon: limits.revision_horizon,
            shutdown,
        }
    }

    /// `min_revision` waits open now.
    pub fn revision_waits(&self) -> usize {
        self.revision_waits.held()
    }

    /// `Watch` streams open now.
    pub fn watch_streams(&self) -> usize {
        self.watch_streams.held()
    }

    /// The replica state evaluated.
    pub(crate) fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// The replica's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A slot among the replica's and `token`'s bounded streams (`Watch`, and the OpenFeature
    /// event streams), or RESOURCE_EXHAUSTED.
    pub(crate) fn take_stream(&self, token: &str) -> Result<Hold, EvalError> {
        Ok(self.watch_streams.take(token)?)
    }

    /// Changes at shutdown, ending streams so the server can drain.
    pub(crate) fn shutdown(&self) -> watch::Receiver<()> {
        self.shutdown.clone()
    }

    /// Takes one of the concurrency permits as a call in flight would, until the result is
    /// dropped; `None` when none is free. Tests and benches hold the limit with it (a call holds
    /// its permit only while it evaluates, microseconds, so no request can hold it on demand).
    pub fn occupy_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inflight.clone().try_acquire_owned().ok()
    }

    /// A permit for one unary call, or RESOURCE_EXHAUSTED at once.
    pub(crate) fn admit(&self) -> Result<SemaphorePermit<'_>, EvalError> {
        self.inflight.try_acquire().map_err(|_| {
            self.metrics.shed.inc();
            EvalError::Overloaded(self.limit)
        })
    }

    /// The state to answer from: at least at `min_revision`, waiting for it until shortly
    /// before the call's deadline (so the answer, not tonic's timeout, reaches the client).
    ///
    /// A wait holds no concurrency permit (the permit is taken after it, to evaluate), but a
    /// slot of the replica's and the token's bounded waits; a revision beyond the writer's head
    /// as last heard waits only [`Limits::revision_horizon`] for news of it.
    async fn replica_at<T>(
        &self,
        request: &Request<T>,
        min_revision: u64,
    ) -> Result<arc_swap::Guard<Arc<Replica>>, EvalError> {
        {
            let replica = self.state.peek();
            if min_revision <= replica.revision {
                return if replica.ready {
                    Ok(replica)
                } else {
                    Err(EvalError::NotReady(replica.revision))
                };
            }
        }
        // Every call here passed `authorize`, so it has an identity.
        let token =
            auth::identity(request).map_or_else(|_| Arc::from(""), |i| i.name.as_str().into());
        let budget = wait_budget(
            request
                .metadata()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok()),
        );
        self.wait_for_revision(&token, budget, min_revision).await
    }

    /// The state to answer from for a caller counted as `token`: at least at `min_revision`,
    /// waiting at most `budget` for it (see [`EvalService::replica_at`]). The OpenFeature front
    /// ends call it with their own token names and deadlines.
    pub(crate) async fn replica_for(
        &self,
        token: &str,
        budget: Duration,
        min_revision: u64,
    ) -> Result<arc_swap::Guard<Arc<Replica>>, EvalError> {
        {
            let replica = self.state.peek();
            if min_revision <= replica.revision {
                return if replica.ready {
                    Ok(replica)
                } else {
                    Err(EvalError::NotReady(replica.revision))
                };
            }
        }
        self.wait_for_revision(token, budget, min_revision).await
    }

    /// Waits for `min_revision`, which the replica has not applied, within `budget`, holding one
    /// of `token`'s bounded waits.
    async fn wait_for_revision(
        &self,
        token: &str,
        budget: Duration,
        min_revision: u64,
    ) -> Result<arc_swap::Guard<Arc<Replica>>, EvalError> {
        let _hold: Hold = self.revision_waits.take(token)?;
        let deadline = tokio::time::Instant::now() + budget;
        let mut shutdown = self.shutdown.clone();
        let head = self.status.head().max(self.state.revision());
        if min_revision > head && self.horizon < budget {
            // The writer had not reached this revision when last heard from: a client that just
            // wrote it is about to be told of it by the stream; any other will never be.
            let heard = tokio::select! {
                heard = tokio::time::timeout(self.horizon, self.status.wait_for_head(min_revision)) => heard.is_ok(),
                _ = shutdown.changed() => return Err(EvalError::RevisionNotReached {
                    wanted: min_revision,
                    applied: self.state.revision(),
                }),
            };
            if !heard && self.state.revision() < min_revision {
                return Err(EvalError::RevisionBeyondHead {
                    wanted: min_revision,
                    head: self.status.head().max(self.state.revision()),
                    horizon: self.horizon,
                });
            }
        }
        // At shutdown the wait ends at once (UNAVAILABLE), so waiting calls do not hold up the
        // drain.
        let reached = tokio::select! {
            reached = tokio::time::timeout_at(deadline, self.state.wait_for_revision(min_revision)) => reached.is_ok(),
            _ = shutdown.changed() => false,
        };
        if reached {
            Ok(self.state.peek())
        } else {
            Err(EvalError::RevisionNotReached {
                wanted: min_revision,
                applied: self.state.revision(),
            })
        }
    }

    /// Evaluates `flag` (`None`: the key named no flag) and counts it; also returns the flag's
    /// extras, for encoding.
    pub(crate) fn evaluate_counted<'s>(
        ns: &'s NamespaceState,
        flag: Option<&'s CompiledFlag>,
        ctx: &engine::Context<'_>,
    ) -> (Evaluation<'s>, Option<&'s FlagExtras>) {
        let Some(flag) = flag else {
            return (Evaluation::not_found(), None);
        };
        let evaluation = ns.flags.evaluate_flag(flag, ctx);
        let extras = ns.extras(flag);
        if let Some(counters) = extras.and_then(|e| e.counters.as_deref()) {
            counters.record(flag.source(), evaluation.variant_index, evaluation.reason);
        }
        (evaluation, extras)
    }

    /// Evaluates flag `key` (already looked up as `flag`, `None` when missing) and counts it; a
    /// missing flag gives a FLAG_NOT_FOUND result.
    fn evaluate_one(
        ns: &NamespaceState,
        key: &str,
        flag: Option<&CompiledFlag>,
        ctx: &engine::Context<'_>,
        revision: u64,
    ) -> pb::EvaluateResponse {
        let (evaluation, _) = Self::evaluate_counted(ns, flag, ctx);
        convert::evaluation(key, &evaluation, revision)
    }

    /// Evaluates and counts `flags` (key, and the flag or `None` when the key names none) and
    /// answers them in order, encoded straight from each flag's prepared pieces; observes the
    /// evaluation latency.
    fn answer_many<'s>(
        &self,
        ns: &'s NamespaceState,
        flags: impl Iterator<Item = (&'s str, Option<&'s CompiledFlag>)>,
        ctx: &engine::Context<'_>,
        revision: u64,
    ) -> Response<pb::EvaluateBatchResponse> {
        let started = Instant::now();
        // A result is typically 60–110 bytes; growing past the guess costs a copy or two.
        let mut encoded = Vec::with_capacity(flags.size_hint().0 * 112);
        for (key, flag) in flags {
            let (evaluation, extras) = Self::evaluate_counted(ns, flag, ctx);
            convert::append_result(
                &mut encoded,
                RESULTS_FIELD,
                key,
                &evaluation,
                extras.map(|e| &e.encoded),
                revision,
            );
        }
        self.metrics.eval_latency.observe(started.elapsed());
        Response::new(pb::EvaluateBatchResponse {
            results: Vec::new(),
            revision,
            encoded_results: encoded,
        })
    }
}

/// `EvaluateBatchResponse.results`.
const RESULTS_FIELD: u32 = 1;

#[tonic::async_trait]
impl FlagEval for EvalService {
    async fn evaluate(
        &self,
        request: Request<pb::EvaluateRequest>,
    ) -> Result<Response<pb::EvaluateResponse>, Status> {
        authorize(&request, &request.get_ref().namespace)?;
        let replica = self
            .replica_at(&request, request.get_ref().min_revision)
            .await?;
        let _permit = self.admit()?;
        let request = request.into_inner();
        let ctx = context_of(request.context.as_ref())?;
        let expected = expected_type(request.expected_type)?;
        let ns = namespace_of(&replica, &request.namespace, &self.metrics)?;
        let Some(flag) = ns.flags.get(&request.flag_key) else {
            return Err(EvalError::FlagNotFound {
                namespace: request.namespace,
                flag: request.flag_key,
            }
            .into());
        };
        if let Some(expected) = expected
            && flag.flag_type() != expected
        {
            return Err(EvalError::TypeMismatch {
                flag: request.flag_key,
                actual: convert::flag_type_name(flag.flag_type()),
                expected: convert::flag_type_name(expected),
            }
            .into());
        }
        let started = Instant::now();
        let response =
            Self::evaluate_one(ns, &request.flag_key, Some(flag), &ctx, replica.revision);
        self.metrics.eval_latency.observe(started.elapsed());
        Ok(Response::new(response))
    }

    async fn evaluate_batch(
        &self,
        request: Request<pb::EvaluateBatchRequest>,
    ) -> Result<Response<pb::EvaluateBatchResponse>, Status> {
        authorize(&request, &request.get_ref().namespace)?;
        let keys = request.get_ref().flag_keys.len();
        if keys > validate::MAX_BATCH_KEYS {
            return Err(EvalError::Limit {
                field: "flag_keys".into(),
                detail: format!("{keys} keys asked for"),
                limit: validate::MAX_BATCH_KEYS,
            }
            .into());
        }
        let replica = self
            .replica_at(&request, request.get_ref().min_revision)
            .await?;
        let _permit = self.admit()?;
        let request = request.into_inner();
        let ctx = context_of(request.context.as_ref())?;
        let ns = namespace_of(&replica, &request.namespace, &self.metrics)?;
        let flags = request
            .flag_keys
            .iter()
            .map(|key| (key.as_str(), ns.flags.get(key)));
        Ok(self.answer_many(ns, flags, &ctx, replica.revision))
    }

    async fn evaluate_all(
        &self,
        request: Request<pb::EvaluateAllRequest>,
    ) -> Result<Response<pb::EvaluateBatchResponse>, Status> {
        authorize(&request, &request.get_ref().namespace)?;
        let replica = self
            .replica_at(&request, request.get_ref().min_revision)
            .await?;
        let _permit = self.admit()?;
        let request = request.into_inner();
        let ctx = context_of(request.context.as_ref())?;
        let ns = namespace_of(&replica, &request.namespace, &self.metrics)?;
        let flags = ns.flags.flags().map(|flag| (flag.key(), Some(flag)));
        Ok(self.answer_many(ns, flags, &ctx, replica.revision))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        authorize(&request, &request.get_ref().namespace)?;
        let token = auth::identity(&request)?;
        let request = request.into_inner();
        let keys = request.flag_keys.len();
        if keys > validate::MAX_WATCH_KEYS {
            return Err(EvalError::Limit {
                field: "flag_keys".into(),
                detail: format!("{keys} keys asked for"),
                limit: validate::MAX_WATCH_KEYS,
            }
            .into());
        }
        if let Some(context) = &request.context {
            check_context(context)?;
        }
        let hold = self
            .watch_streams
            .take(&token.name)
            .map_err(EvalError::from)?;
        // Subscribe before reading the state, so that no change falls between the two.
        let changes = self.state.subscribe_changes();
        let replica = self.state.load();
        if !replica.ready {
            return Err(EvalError::NotReady(replica.revision).into());
        }
        namespace_of(&replica, &request.namespace, &self.metrics)?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let first = pb::WatchEvent {
            revision: replica.revision,
            ..Default::default()
        };
        // Cannot fail: the channel is new and has room.
        let _ = tx.try_send(Ok(first));
        let watcher = Watcher {
            state: self.state.clone(),
            subscription: Arc::new(Subscription {
                keys: request.flag_keys.into_iter().collect(),
                context: request.context,
                namespace: request.namespace,
            }),
            from: replica.revision,
            tx,
            _hold: hold,
        };
        tokio::spawn(watcher.run(changes, self.shutdown.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_state_digest(
        &self,
        request: Request<pb::GetStateDigestRequest>,
    ) -> Result<Response<pb::StateDigest>, Status> {
        auth::check(
            &request,
            format_args!(
                "read the replica's state digest (needs an eval token for every namespace, or sync)"
            ),
            |identity| {
                identity.scopes.contains(&auth::Scope::Eval(None))
                    || identity.scopes.contains(&auth::Scope::Sync)
            },
        )?;
        if !request.get_ref().namespaces.is_empty() {
            return Err(Status::invalid_argument(
                "namespaces: must be empty: a replica's digest covers the namespaces it follows",
            ));
        }
        let replica = self.state.load();
        if !replica.ready {
            return Err(Status::unavailable("the replica holds no full state yet"));
        }
        let namespaces = self.state.followed();
        let digest = tokio::task::spawn_blocking(move || replica_digest(&replica))
            .await
            .map_err(|e| Status::internal(format!("computing the digest: {e}")))?;
        Ok(Response::new(pb::StateDigest {
            namespaces,
            ..digest
        }))
    }
}

/// One `Watch` subscription: forwards applied changes that touch its namespace.
///
/// Exit: when the client goes away (the receiver is dropped), when the state's change channel
/// closes, or at shutdown (so that the server's drain is not held up by open streams).
struct Watcher {
    state: Arc<State>,
    subscription: Arc<Subscription>,
    /// Changes at or below this revision were already reported by the first event.
    from: u64,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
    /// The stream's slot among the replica's and the token's bounded streams.
    _hold: Hold,
}

/// What a `Watch` stream asked for.
struct Subscription {
    namespace: String,
    /// The flags followed; empty follows every flag of the namespace.
    keys: HashSet<String>,
    /// When set, each event carries the changed flags' results for this context.
    context: Option<pb::Context>,
}

/// Events whose results take more evaluations than this are computed on the blocking pool, not
/// on the async workers (a change to every flag of a large namespace, with a context).
const INLINE_EVALUATIONS: usize = 64;

impl Watcher {
    async fn run(
        self,
        mut changes: broadcast::Receiver<Arc<Applied>>,
        mut shutdown: watch::Receiver<()>,
    ) {
        loop {
            let applied = tokio::select! {
                _ = self.tx.closed() => return,
                _ = shutdown.changed() => return,
                change = changes.recv() => match change {
                    Ok(applied) if applied.revision <= self.from && !applied.full_refresh => continue,
                    Ok(applied) => applied,
                    // The subscriber fell behind the backlog: tell it to refresh everything.
                    Err(broadcast::error::RecvError::Lagged(_)) => Arc::new(Applied {
                        revision: self.state.revision(),
                        full_refresh: true,
                        changed: Default::default(),
                    }),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            let Some(changed) = self.subscription.changed(&applied) else {
                continue;
            };
            let event = if self.subscription.context.is_some() && changed.len() > INLINE_EVALUATIONS
            {
                let (state, subscription) = (self.state.clone(), self.subscription.clone());
                let evaluate = move || subscription.event(&state, applied.revision, changed);
                tokio::select! {
                    _ = self.tx.closed() => return,
                    event = tokio::task::spawn_blocking(evaluate) => match event {
                        Ok(event) => event,
                        Err(_) => return,
                    },
                }
            } else {
                self.subscription
                    .event(&self.state, applied.revision, changed)
            };
            if self.tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    }
}

impl Subscription {
    /// The flags of `applied` this subscription follows; `Some(empty)` for a full refresh,
    /// `None` when the change does not concern it.
    fn changed(&self, applied: &Applied) -> Option<Vec<String>> {
        if applied.full_refresh {
            return Some(Vec::new());
        }
        let keys = applied.changed.get(&self.namespace)?;
        let changed: Vec<String> = keys
            .iter()
            .filter(|key| self.keys.is_empty() || self.keys.contains(key.as_str()))
            .cloned()
            .collect();
        (!changed.is_empty()).then_some(changed)
    }

    /// The event for a change of `changed` at `revision` (a full refresh when empty), with
    /// their results when a context was given.
    fn event(&self, state: &State, revision: u64, changed: Vec<String>) -> pb::WatchEvent {
        if changed.is_empty() {
            return pb::WatchEvent {
                revision,
                full_refresh: true,
                ..Default::default()
            };
        }
        let mut results = Vec::new();
        if let Some(context) = &self.context {
            // The newest state: at least this change, perhaps more (the next event repeats them).
            let replica = state.load();
            let ctx = convert::context(context);
            let ns = replica.namespaces.get(&self.namespace);
            results.reserve(changed.len());
            for key in &changed {
                results.push(match ns {
                    Some(ns) => EvalService::evaluate_one(
                        ns,
                        key,
                        ns.flags.get(key),
                        &ctx,
                        replica.revision,
                    ),
                    None => pb::EvaluateResponse {
                        flag_key: key.clone(),
                        reason: pb::Reason::Error.into(),
                        error_code: pb::ErrorCode::FlagNotFound.into(),
                        error_message: format!("namespace {} not found", shown(&self.namespace)),
                        rule_index: -1,
                        revision: replica.revision,
                        ..Default::default()
                    },
                });
            }
        }
        pb::WatchEvent {
            revision,
            changed_flags: changed,
            results,
            full_refresh: false,
        }
    }
}

/// How long a `min_revision` wait may last given the call's `grpc-timeout` header: a little
/// less than the deadline (tonic answers CANCELLED at the deadline itself), at most
/// [`MAX_REVISION_WAIT`].
pub fn wait_budget(grpc_timeout: Option<&str>) -> Duration {
    let Some(deadline) = grpc_timeout.and_then(parse_grpc_timeout) else {
        return MAX_REVISION_WAIT;
    };
    let margin = (deadline / 10).min(Duration::from_millis(50));
    deadline.saturating_sub(margin).min(MAX_REVISION_WAIT)
}

/// Parses a `grpc-timeout` header value (`<digits><unit>`, unit one of H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 || !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Checks the context's documented limits (properties, key and value sizes) with the same rules
/// and messages as every other boundary.
fn check_context(context: &pb::Context) -> Result<(), EvalError> {
    validate::context(context).map_err(|e| EvalError::Context(e.at("context")))
}

/// The request's context, checked against the limits and lent to the engine; an absent context
/// is an empty one.
fn context_of(context: Option<&pb::Context>) -> Result<engine::Context<'_>, EvalError> {
    match context {
        Some(context) => {
            check_context(context)?;
            Ok(convert::context(context))
        }
        None => Ok(engine::Context::default()),
    }
}

/// The flag type asked for, `None` when unspecified.
fn expected_type(value: i32) -> Result<Option<flagstream::model::FlagType>, EvalError> {
    let wire = pb::FlagType::try_from(value).map_err(|_| EvalError::UnknownType(value))?;
    // UNSPECIFIED, the only wire type without a model type, means "any".
    Ok(flagstream::model::FlagType::try_from(wire).ok())
}

/// The namespace `key` of `replica`, or NOT_FOUND.
pub(crate) fn namespace_of<'r>(
    replica: &'r Replica,
    key: &str,
    metrics: &Metrics,
) -> Result<&'r NamespaceState, EvalError> {
    replica.namespaces.get(key).map(|ns| &**ns).ok_or_else(|| {
        metrics.unknown_namespace.inc();
        EvalError::NamespaceNotFound(key.to_string())
    })
}

/// The digest of everything `replica` holds (see `flagstream::digest`).
fn replica_digest(replica: &Replica) -> pb::StateDigest {
    let mut digest = flagstream::digest::Digest::default();
    for ns in replica.namespaces.values() {
        digest.add_namespace(&ns.namespace);
        for flag in ns.flags.flags() {
            digest.add_flag(flag.source());
        }
        for segment in ns.flags.segments() {
            digest.add_segment(segment);
        }
    }
    pb::StateDigest {
        revision: replica.revision,
        history_id: replica.history.id.clone(),
        chain: flagstream::digest::hex(&replica.history.chain),
        digest: digest.hex(),
        namespaces: Vec::new(),
        namespace_count: digest.namespaces,
        flag_count: digest.flags,
        segment_count: digest.segments,
    }
}

/// PERMISSION_DENIED unless the caller's token may evaluate flags of `namespace`. Allocates only
/// when refusing, since it runs on every call.
fn authorize<T>(request: &Request<T>, namespace: &str) -> Result<(), Status> {
    auth::check(
        request,
        format_args!("evaluate flags of namespace {}", shown(namespace)),
        |identity| identity.can_eval(namespace),
    )?;
    Ok(())
}
