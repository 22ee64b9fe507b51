//! The FlagEval gRPC service: evaluates flags from the published replica state, waits for
//! `min_revision` within the call's deadline, and streams applied changes to `Watch` clients.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagstream::engine::{self, CompiledFlag, Evaluation};
use flagstream::kit::auth;
use flagstream::pb;
use flagstream::pb::flag_eval_server::FlagEval;
use flagstream::{convert, validate};
use tokio::sync::{Semaphore, SemaphorePermit, broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::state::{Applied, FlagExtras, NamespaceState, Replica, State};

/// The longest `min_revision` wait when the call has no deadline, as eval.proto documents.
pub const MAX_REVISION_WAIT: Duration = Duration::from_secs(30);

/// Events a `Watch` subscriber may have queued before the replica stops waiting for it and the
/// subscriber gets a full-refresh event instead.
const WATCH_QUEUE: usize = 64;

/// The FlagEval implementation.
#[derive(Clone)]
pub struct EvalService {
    /// The replica state evaluated.
    state: Arc<State>,
    /// Latency histogram and shed counter.
    metrics: Arc<Metrics>,
    /// Permits for unary calls in flight; when none is left a call is refused at once with
    /// RESOURCE_EXHAUSTED rather than queued, so an overloaded replica sheds load to its peers.
    inflight: Arc<Semaphore>,
    /// The concurrency limit, for the refusal message.
    limit: usize,
    /// Closes at shutdown, ending every `Watch` stream so the server can drain.
    shutdown: watch::Receiver<()>,
}

/// Why a FlagEval call failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The namespace is not held by this replica.
    #[error("namespace {0:?} not found")]
    NamespaceNotFound(String),
    /// The flag does not exist in the namespace.
    #[error("flag {flag:?} not found in namespace {namespace:?}")]
    FlagNotFound { namespace: String, flag: String },
    /// `expected_type` is not the flag's type.
    #[error("flag {flag:?} is of type {actual}, not {expected}")]
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
            EvalError::Overloaded(_) => Status::resource_exhausted(message),
        }
    }
}

type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

impl EvalService {
    /// A service evaluating `state`, with at most `limit` unary calls in flight.
    pub fn new(
        state: Arc<State>,
        metrics: Arc<Metrics>,
        limit: usize,
        shutdown: watch::Receiver<()>,
    ) -> EvalService {
        EvalService {
            state,
            metrics,
            inflight: Arc::new(Semaphore::new(limit)),
            limit,
            shutdown,
        }
    }

    /// A permit for one unary call, or RESOURCE_EXHAUSTED at once.
    fn admit(&self) -> Result<SemaphorePermit<'_>, EvalError> {
        self.inflight.try_acquire().map_err(|_| {
            self.metrics.shed.inc();
            EvalError::Overloaded(self.limit)
        })
    }

    /// The state to answer from: at least at `min_revision`, waiting for it until shortly
    /// before the call's deadline (so the answer, not tonic's timeout, reaches the client).
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
        let budget = wait_budget(
            request
                .metadata()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok()),
        );
        let mut shutdown = self.shutdown.clone();
        // At shutdown the wait ends at once (UNAVAILABLE), so waiting calls do not hold up the
        // drain.
        let reached = tokio::select! {
            reached = tokio::time::timeout(budget, self.state.wait_for_revision(min_revision)) => reached.is_ok(),
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
    fn evaluate_counted<'s>(
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
        let _permit = self.admit()?;
        authorize(&request, &request.get_ref().namespace)?;
        let replica = self
            .replica_at(&request, request.get_ref().min_revision)
            .await?;
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
        let _permit = self.admit()?;
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
        let _permit = self.admit()?;
        authorize(&request, &request.get_ref().namespace)?;
        let replica = self
            .replica_at(&request, request.get_ref().min_revision)
            .await?;
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
        let request = request.into_inner();
        if let Some(context) = &request.context {
            check_context(context)?;
        }
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
            service: self.clone(),
            request,
            from: replica.revision,
            tx,
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
    service: EvalService,
    request: pb::WatchRequest,
    /// Changes at or below this revision were already reported by the first event.
    from: u64,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
}

impl Watcher {
    async fn run(
        self,
        mut changes: broadcast::Receiver<Arc<Applied>>,
        mut shutdown: watch::Receiver<()>,
    ) {
        loop {
            let event = tokio::select! {
                _ = self.tx.closed() => return,
                _ = shutdown.changed() => return,
                change = changes.recv() => match change {
                    Ok(applied) if applied.revision <= self.from && !applied.full_refresh => continue,
                    Ok(applied) => self.event(&applied),
                    // The subscriber fell behind the backlog: tell it to refresh everything.
                    Err(broadcast::error::RecvError::Lagged(_)) => Some(pb::WatchEvent {
                        revision: self.service.state.revision(),
                        full_refresh: true,
                        ..Default::default()
                    }),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if let Some(event) = event
                && self.tx.send(Ok(event)).await.is_err()
            {
                return;
            }
        }
    }

    /// The event for one applied change, or `None` when it does not concern this subscriber.
    fn event(&self, applied: &Applied) -> Option<pb::WatchEvent> {
        if applied.full_refresh {
            return Some(pb::WatchEvent {
                revision: applied.revision,
                full_refresh: true,
                ..Default::default()
            });
        }
        let keys = applied.changed.get(&self.request.namespace)?;
        let changed: Vec<String> = keys
            .iter()
            .filter(|key| self.request.flag_keys.is_empty() || self.request.flag_keys.contains(key))
            .cloned()
            .collect();
        if changed.is_empty() {
            return None;
        }
        let mut results = Vec::new();
        if let Some(context) = &self.request.context {
            // The newest state: at least this change, perhaps more (the next event repeats them).
            let replica = self.service.state.load();
            let ctx = convert::context(context);
            let ns = replica.namespaces.get(&self.request.namespace);
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
                        error_message: format!("namespace {:?} not found", self.request.namespace),
                        rule_index: -1,
                        revision: replica.revision,
                        ..Default::default()
                    },
                });
            }
        }
        Some(pb::WatchEvent {
            revision: applied.revision,
            changed_flags: changed,
            results,
            full_refresh: false,
        })
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
fn namespace_of<'r>(
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
        format_args!("evaluate flags of namespace {namespace:?}"),
        |identity| identity.can_eval(namespace),
    )?;
    Ok(())
}
