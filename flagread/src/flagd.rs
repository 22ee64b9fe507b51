//! flagd's evaluation protocol (`flagd.evaluation.v1` and `v2`) on flagread's gRPC port, so the
//! flagd OpenFeature providers (RPC resolver) evaluate flagstream flags unchanged.
//!
//! A call reads the namespace its `flagd-selector` header names (or the default namespace), as
//! the token in its `authorization` header allows, or without a token an anonymous namespace
//! ([`crate::openfeature::Access`]). Results carry OpenFeature's reasons; errors use the status
//! codes the providers map to OpenFeature's error codes: NOT_FOUND (FLAG_NOT_FOUND),
//! INVALID_ARGUMENT (TYPE_MISMATCH, or a context or selector the replica cannot use), INTERNAL
//! for an evaluation that failed. Never UNKNOWN: the providers retry it until their deadline.
//!
//! `EventStream` announces `provider_ready` at once, then one `configuration_change` naming every
//! flag of the namespace (a provider reconnecting after an outage may hold cached results of
//! flags changed meanwhile: this drops them), then for each change a `configuration_change`
//! naming every flag of the namespace whose result may have changed (its prerequisites' and
//! segments' users included), `keep_alive` when idle, and `provider_shutdown` before the stream
//! ends with UNAVAILABLE at shutdown (a provider reconnects after an error, never after a stream
//! that ends OK). An event names at most 5,000 flags; more take several events.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagstream::convert;
use flagstream::engine::CompiledFlag;
use flagstream::model;
use flagstream::pb::flagd::{v1, v2};
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::holds::Hold;
use crate::openfeature::{
    self, Access, Caller, MIN_REVISION_HEADER, Mapped, OpenFeatureError, Outcome, SELECTOR_HEADER,
    Wanted,
};
use crate::service::{EvalError, EvalService, namespace_of, wait_budget};
use crate::state::{Applied, State};

/// Events an `EventStream` subscriber may have queued; past it the stream waits for the client.
const EVENT_QUEUE: usize = 64;

/// Changes naming more flags than this are described on the blocking pool, not on the async
/// workers (a new snapshot of a large namespace).
const INLINE_FLAGS: usize = 256;

/// How long the last events of a stream (`provider_shutdown`, then the error that ends it) may
/// wait for room in the stream's queue at shutdown.
const SHUTDOWN_SEND: Duration = Duration::from_secs(1);

/// flagd's evaluation services over the replica's state: one value serves both versions.
#[derive(Clone)]
pub struct FlagdService {
    /// The FlagEval service whose state, bounds and metrics the resolvers share.
    eval: EvalService,
    /// Who may read which namespace, and the default namespace.
    access: Arc<Access>,
    /// Idle time after which an event stream gets a `keep_alive` event.
    keepalive: Duration,
}

/// One resolved flag, ready to be put into a response.
struct Resolved {
    value: model::Value,
    variant: String,
    reason: &'static str,
    metadata: Struct,
}

/// An event of an event stream, before it is put into a v1 or v2 message.
type Event = (&'static str, Option<Struct>);

type EventStream<M> = Pin<Box<dyn tokio_stream::Stream<Item = Result<M, Status>> + Send>>;

impl FlagdService {
    /// Resolvers evaluating `eval`'s state, as `access` allows; event streams get a keepalive
    /// event after `keepalive` of silence.
    pub fn new(eval: EvalService, access: Arc<Access>, keepalive: Duration) -> FlagdService {
        FlagdService {
            eval,
            access,
            keepalive: keepalive.max(Duration::from_millis(100)),
        }
    }

    /// The caller and the namespace it reads, from the call's headers.
    fn caller(&self, metadata: &MetadataMap) -> Result<Caller, OpenFeatureError> {
        let header = |name: &str| metadata.get(name).map(|v| v.as_bytes());
        self.access
            .admit(header(SELECTOR_HEADER), header("authorization"))
    }

    /// Resolves flag `key` as `wanted` for `context`, given the call's headers.
    async fn resolve(
        &self,
        metadata: &MetadataMap,
        key: &str,
        context: Option<Struct>,
        wanted: Wanted,
    ) -> Result<Resolved, OpenFeatureError> {
        let caller = self.caller(metadata)?;
        let mapped = mapped_context(context)?;
        let min_revision = openfeature::min_revision(
            metadata.get(MIN_REVISION_HEADER).map(|v| v.as_bytes()),
            &mapped,
        )?;
        let budget = wait_budget(metadata.get("grpc-timeout").and_then(|v| v.to_str().ok()));
        let replica = self
            .eval
            .replica_for(caller.token(), budget, min_revision)
            .await?;
        let _permit = self.eval.admit()?;
        let not_found = || OpenFeatureError::FlagNotFound {
            namespace: caller.namespace.clone(),
            flag: key.to_string(),
        };
        let ns = namespace_of(&replica, &caller.namespace, self.eval.metrics())
            .map_err(|_| not_found())?;
        let flag = ns.flags.get(key).ok_or_else(not_found)?;
        openfeature::check_type(flag, wanted)?;
        let ctx = convert::context(&mapped.context);
        let started = Instant::now();
        let (evaluation, _) = EvalService::evaluate_counted(ns, Some(flag), &ctx);
        self.eval.metrics().eval_latency.observe(started.elapsed());
        let Outcome {
            value,
            variant,
            reason,
        } = openfeature::outcome(flag, &evaluation)?;
        match (wanted, value) {
            (Wanted::Integer, model::Value::Number(n)) => {
                openfeature::integer(key, *n)?;
            }
            (Wanted::Object, model::Value::Json(json)) => {
                openfeature::object(key, json)?;
            }
            _ => {}
        }
        Ok(Resolved {
            value: value.clone(),
            variant: variant.to_string(),
            reason,
            metadata: result_metadata(flag, &caller.namespace, replica.revision),
        })
    }

    /// Every flag of the caller's namespace that resolves to a value (v1 `ResolveAll`); flags
    /// that fail, and JSON flags serving something other than an object, are left out, as flagd
    /// does.
    async fn resolve_all(
        &self,
        metadata: &MetadataMap,
        context: Option<Struct>,
    ) -> Result<(BTreeMap<String, v1::AnyFlag>, Struct), OpenFeatureError> {
        let caller = self.caller(metadata)?;
        let mapped = mapped_context(context)?;
        let min_revision = openfeature::min_revision(
            metadata.get(MIN_REVISION_HEADER).map(|v| v.as_bytes()),
            &mapped,
        )?;
        let budget = wait_budget(metadata.get("grpc-timeout").and_then(|v| v.to_str().ok()));
        let replica = self
            .eval
            .replica_for(caller.token(), budget, min_revision)
            .await?;
        let _permit = self.eval.admit()?;
        let mut flags = BTreeMap::new();
        let set_metadata = structure([
            ("flagSetId", string(&caller.namespace)),
            ("revision", number(replica.revision as f64)),
        ]);
        let Some(ns) = replica.namespaces.get(&caller.namespace) else {
            return Ok((flags, set_metadata));
        };
        let ctx = convert::context(&mapped.context);
        let started = Instant::now();
        for flag in ns.flags.flags() {
            let (evaluation, _) = EvalService::evaluate_counted(ns, Some(flag), &ctx);
            let Ok(outcome) = openfeature::outcome(flag, &evaluation) else {
                continue;
            };
            let value = match outcome.value {
                model::Value::Bool(b) => v1::any_flag::Value::BoolValue(*b),
                model::Value::String(s) => v1::any_flag::Value::StringValue(s.clone()),
                model::Value::Number(n) => v1::any_flag::Value::DoubleValue(*n),
                model::Value::Json(json) => match openfeature::object(flag.key(), json) {
                    Ok(object) => v1::any_flag::Value::ObjectValue(object_struct(object)),
                    Err(_) => continue,
                },
            };
            flags.insert(
                flag.key().to_string(),
                v1::AnyFlag {
                    reason: outcome.reason.to_string(),
                    variant: outcome.variant.to_string(),
                    value: Some(value),
                    metadata: Some(result_metadata(flag, &caller.namespace, replica.revision)),
                },
            );
        }
        self.eval.metrics().eval_latency.observe(started.elapsed());
        Ok((flags, set_metadata))
    }

    /// Opens an event stream of the caller's namespace: `provider_ready` first.
    fn events<T>(
        &self,
        request: &Request<T>,
    ) -> Result<ReceiverStream<Result<Event, Status>>, OpenFeatureError> {
        let caller = self.caller(request.metadata())?;
        let hold = self.eval.take_stream(caller.token())?;
        // Subscribe before reading the state, so that no change falls between the two.
        let changes = self.eval.state().subscribe_changes();
        let replica = self.eval.state().load();
        if !replica.ready {
            return Err(EvalError::NotReady(replica.revision).into());
        }
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        // Cannot fail: the channel is new and has room.
        let _ = tx.try_send(Ok(("provider_ready", None)));
        let stream = Events {
            state: self.eval.state().clone(),
            namespace: caller.namespace,
            from: replica.revision,
            keepalive: self.keepalive,
            tx,
            _hold: hold,
        };
        tokio::spawn(stream.run(changes, self.eval.shutdown()));
        Ok(ReceiverStream::new(rx))
    }
}

/// The context of a call, mapped; an absent context is an empty one.
fn mapped_context(context: Option<Struct>) -> Result<Mapped, OpenFeatureError> {
    match context {
        Some(context) => openfeature::map_struct(context.fields),
        None => Ok(Mapped::default()),
    }
}

/// A resolution's metadata: the flag's own, plus `flagSetId` (the namespace) and `revision` (the
/// replica's applied revision).
fn result_metadata(flag: &CompiledFlag, namespace: &str, revision: u64) -> Struct {
    let mut fields: BTreeMap<String, Value> = flag
        .metadata()
        .iter()
        .map(|(key, value)| (key.clone(), string(value)))
        .collect();
    fields.insert("flagSetId".into(), string(namespace));
    fields.insert("revision".into(), number(revision as f64));
    Struct { fields }
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn structure<const N: usize>(fields: [(&str, Value); N]) -> Struct {
    Struct {
        fields: fields
            .into_iter()
            .map(|(key, value)| (key.to_string(), value))
            .collect(),
    }
}

fn object_struct(object: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: object
            .iter()
            .map(|(key, value)| (key.clone(), convert::json_ref_to_pb(value)))
            .collect(),
    }
}

/// One event stream: forwards applied changes of its namespace as `configuration_change`
/// events, and `keep_alive` when there was nothing to say for a while.
///
/// Exit: when the client goes away (the receiver is dropped), when the state's change channel
/// closes, or at shutdown (after `provider_shutdown` and an UNAVAILABLE status, so that the
/// provider reconnects elsewhere).
struct Events {
    state: Arc<State>,
    namespace: String,
    /// Changes at or below this revision happened before the stream opened.
    from: u64,
    keepalive: Duration,
    tx: mpsc::Sender<Result<Event, Status>>,
    /// The stream's slot among the replica's and the token's bounded streams.
    _hold: Hold,
}

impl Events {
    async fn run(
        self,
        mut changes: broadcast::Receiver<Arc<Applied>>,
        mut shutdown: watch::Receiver<()>,
    ) {
        let idle = tokio::time::sleep(self.keepalive);
        tokio::pin!(idle);
        // First, every flag of the namespace: a provider reconnecting after an outage may hold
        // results cached before it, of flags changed meanwhile (no event named them).
        let mut next = Some(Arc::new(Applied {
            revision: self.from,
            changed: Default::default(),
            full_refresh: true,
        }));
        loop {
            let applied = match next.take() {
                Some(applied) => applied,
                None => tokio::select! {
                    _ = self.tx.closed() => return,
                    _ = shutdown.changed() => {
                        let end = async {
                            self.tx.send(Ok(("provider_shutdown", None))).await?;
                            self.tx
                                .send(Err(Status::unavailable(
                                    "flagread is shutting down; reconnect to another replica",
                                )))
                                .await
                        };
                        let _ = tokio::time::timeout(SHUTDOWN_SEND, end).await;
                        return;
                    }
                    _ = &mut idle => {
                        if self.tx.send(Ok(("keep_alive", None))).await.is_err() {
                            return;
                        }
                        idle.as_mut().reset(tokio::time::Instant::now() + self.keepalive);
                        continue;
                    }
                    change = changes.recv() => match change {
                        Ok(applied) if applied.revision <= self.from && !applied.full_refresh => continue,
                        Ok(applied) => applied,
                        // The stream fell behind the backlog: every flag may have changed.
                        Err(broadcast::error::RecvError::Lagged(_)) => Arc::new(Applied {
                            revision: self.state.revision(),
                            full_refresh: true,
                            changed: Default::default(),
                        }),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                },
            };
            let size = if applied.full_refresh {
                usize::MAX
            } else {
                match applied.changed.get(&self.namespace) {
                    Some(keys) => keys.len(),
                    None => continue,
                }
            };
            let events = if size > INLINE_FLAGS {
                let (state, namespace) = (self.state.clone(), self.namespace.clone());
                let describe = move || changed_flags(&state, &namespace, &applied);
                tokio::select! {
                    _ = self.tx.closed() => return,
                    events = tokio::task::spawn_blocking(describe) => match events {
                        Ok(events) => events,
                        Err(_) => return,
                    },
                }
            } else {
                changed_flags(&self.state, &self.namespace, &applied)
            };
            for data in events {
                if self
                    .tx
                    .send(Ok(("configuration_change", Some(data))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            idle.as_mut()
                .reset(tokio::time::Instant::now() + self.keepalive);
        }
    }
}

/// The most flags one `configuration_change` event names; a change of more is announced in
/// several events, so each stays well within a client's default message size (4 MiB): keys are
/// at most 256 bytes.
const FLAGS_PER_EVENT: usize = 5_000;

/// The data of the `configuration_change` events announcing `applied` to a stream of
/// `namespace`: `{"flags": {key: {"type": kind}}}` for every flag of the namespace that `applied`
/// may have changed, where kind is `write` (created by the change), `delete` (gone) or
/// `update`; a full refresh names every flag as `update`. At most [`FLAGS_PER_EVENT`] flags per
/// event; none when the change names no flag of the namespace.
fn changed_flags(state: &State, namespace: &str, applied: &Applied) -> Vec<Struct> {
    let replica = state.load();
    let ns = replica.namespaces.get(namespace);
    let kind = |kind: &str| Value {
        kind: Some(Kind::StructValue(structure([("type", string(kind))]))),
    };
    let mut flags: Vec<(String, Value)> = Vec::new();
    if applied.full_refresh {
        for flag in ns.iter().flat_map(|ns| ns.flags.flags()) {
            flags.push((flag.key().to_string(), kind("update")));
        }
    } else {
        for key in applied.changed.get(namespace).into_iter().flatten() {
            let kind = match ns.and_then(|ns| ns.flags.get(key)) {
                None => kind("delete"),
                Some(flag) if flag.source().stamp.created_revision == applied.revision => {
                    kind("write")
                }
                Some(_) => kind("update"),
            };
            flags.push((key.clone(), kind));
        }
    }
    let mut events = Vec::with_capacity(flags.len().div_ceil(FLAGS_PER_EVENT));
    let mut flags = flags.into_iter().peekable();
    while flags.peek().is_some() {
        let chunk: BTreeMap<String, Value> = flags.by_ref().take(FLAGS_PER_EVENT).collect();
        events.push(structure([(
            "flags",
            Value {
                kind: Some(Kind::StructValue(Struct { fields: chunk })),
            },
        )]));
    }
    events
}

// ---------------------------------------------------------------------------
// The two versions of the protocol.

/// `flagd.evaluation.v2.Service`: values and variants with explicit presence.
#[tonic::async_trait]
impl v2::service_server::Service for FlagdService {
    async fn resolve_boolean(
        &self,
        request: Request<v2::ResolveBooleanRequest>,
    ) -> Result<Response<v2::ResolveBooleanResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let r = self
            .resolve(
                &metadata,
                &message.flag_key,
                message.context,
                Wanted::Boolean,
            )
            .await?;
        Ok(Response::new(v2::ResolveBooleanResponse {
            value: Some(matches!(r.value, model::Value::Bool(true))),
            reason: r.reason.to_string(),
            variant: Some(r.variant),
            metadata: Some(r.metadata),
        }))
    }

    async fn resolve_string(
        &self,
        request: Request<v2::ResolveStringRequest>,
    ) -> Result<Response<v2::ResolveStringResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let r = self
            .resolve(
                &metadata,
                &message.flag_key,
                message.context,
                Wanted::String,
            )
            .await?;
        Ok(Response::new(v2::ResolveStringResponse {
            value: Some(string_of(r.value)),
            reason: r.reason.to_string(),
            variant: Some(r.variant),
            metadata: Some(r.metadata),
        }))
    }

    async fn resolve_float(
        &self,
        request: Request<v2::ResolveFloatRequest>,
    ) -> Result<Response<v2::ResolveFloatResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let r = self
            .resolve(&metadata, &message.flag_key, message.context, Wanted::Float)
            .await?;
        Ok(Response::new(v2::ResolveFloatResponse {
            value: Some(number_of(&r.value)),
            reason: r.reason.to_string(),
            variant: Some(r.variant),
            metadata: Some(r.metadata),
        }))
    }

    async fn resolve_int(
        &self,
        request: Request<v2::ResolveIntRequest>,
    ) -> Result<Response<v2::ResolveIntResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let r = self
            .resolve(
                &metadata,
                &message.flag_key,
                message.context,
                Wanted::Integer,
            )
            .await?;
        Ok(Response::new(v2::ResolveIntResponse {
            // `resolve` checked it is a whole number within ±(2^53−1).
            value: Some(number_of(&r.value) as i64),
            reason: r.reason.to_string(),
            variant: Some(r.variant),
            metadata: Some(r.metadata),
        }))
    }

    async fn resolve_object(
        &self,
        request: Request<v2::ResolveObjectRequest>,
    ) -> Result<Response<v2::ResolveObjectResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let r = self
            .resolve(
                &metadata,
                &message.flag_key,
                message.context,
                Wanted::Object,
            )
            .await?;
        Ok(Response::new(v2::ResolveObjectResponse {
            value: Some(struct_of(&r.value)),
            reason: r.reason.to_string(),
            variant: Some(r.variant),
            metadata: Some(r.metadata),
        }))
    }

    type EventStreamStream = EventStream<v2::EventStreamResponse>;

    async fn event_stream(
        &self,
        request: Request<v2::EventStreamRequest>,
    ) -> Result<Response<Self::EventStreamStream>, Status> {
        let events = self.events(&request)?;
        Ok(Response::new(Box::pin(events.map(|event| {
            event.map(|(kind, data)| v2::EventStreamResponse {
                r#type: kind.to_string(),
                data,
            })
        }))))
    }
}

/// `flagd.evaluation.v1.Service`: as v2, plus `ResolveAll`.
#[tonic::async_trait]
impl v1::service_server::Service for FlagdService {
    async fn resolve_all(
        &self,
        request: Request<v1::ResolveAllRequest>,
    ) -> Result<Response<v1::ResolveAllResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let (flags, metadata) = self.resolve_all(&metadata, message.context).await?;
        Ok(Response::new(v1::ResolveAllResponse {
            flags: flags.into_iter().collect(),
            metadata: Some(metadata),
        }))
    }

    async fn resolve_boolean(
        &self,
        request: Request<v1::ResolveBooleanRequest>,
    ) -> Result<Response<v1::ResolveBooleanResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let r = self
            .resolve(
                &metadata,
                &message.flag_key,
                message.context,
                Wanted::Boolean,
            )
            .await?;
        Ok(Response::new(v1::ResolveBooleanResponse {
            value: matches!(r.value, model::Value::Bool(true)),
            reason: r.reason.to_string(),
            variant: r.variant,
            metadata: Some(r.metadata),
        }))
    }

    async fn resolve_string(
        &self,
        request: Request<v1::ResolveStringRequest>,
    ) -> Result<Response<v1::ResolveStringResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let r = self
            .resolve(
                &metadata,
                &message.flag_key,
                message.context,
                Wanted::String,
            )
            .await?;
        Ok(Response::new(v1::ResolveStringResponse {
            value: string_of(r.value),
            reason: r.reason.to_string(),
            variant: r.variant,
            metadata: Some(r.metadata),
        }))
    }

    async fn resolve_float(
        &self,
        request: Request<v1::ResolveFloatRequest>,
    ) -> Result<Response<v1::ResolveFloatResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let r = self
            .resolve(&metadata, &message.flag_key, message.context, Wanted::Float)
            .await?;
        Ok(Response::new(v1::ResolveFloatResponse {
            value: number_of(&r.value),
            reason: r.reason.to_string(),
            variant: r.variant,
            metadata: Some(r.metadata),
        }))
    }

    async fn resolve_int(
        &self,
        request: Request<v1::ResolveIntRequest>,
    ) -> Result<Response<v1::ResolveIntResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let r = self
            .resolve(
                &metadata,
                &message.flag_key,
                message.context,
                Wanted::Integer,
            )
            .await?;
        Ok(Response::new(v1::ResolveIntResponse {
            value: number_of(&r.value) as i64,
            reason: r.reason.to_string(),
            variant: r.variant,
            metadata: Some(r.metadata),
        }))
    }

    async fn resolve_object(
        &self,
        request: Request<v1::ResolveObjectRequest>,
    ) -> Result<Response<v1::ResolveObjectResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let r = self
            .resolve(
                &metadata,
                &message.flag_key,
                message.context,
                Wanted::Object,
            )
            .await?;
        Ok(Response::new(v1::ResolveObjectResponse {
            value: Some(struct_of(&r.value)),
            reason: r.reason.to_string(),
            variant: r.variant,
            metadata: Some(r.metadata),
        }))
    }

    type EventStreamStream = EventStream<v1::EventStreamResponse>;

    async fn event_stream(
        &self,
        request: Request<v1::EventStreamRequest>,
    ) -> Result<Response<Self::EventStreamStream>, Status> {
        let events = self.events(&request)?;
        Ok(Response::new(Box::pin(events.map(|event| {
            event.map(|(kind, data)| v1::EventStreamResponse {
                r#type: kind.to_string(),
                data,
            })
        }))))
    }
}

/// The string a STRING flag served (`resolve` checked the type).
fn string_of(value: model::Value) -> String {
    match value {
        model::Value::String(s) => s,
        _ => String::new(),
    }
}

/// The number a NUMBER flag served (`resolve` checked the type).
fn number_of(value: &model::Value) -> f64 {
    match value {
        model::Value::Number(n) => *n,
        _ => 0.0,
    }
}

/// The object a JSON flag served (`resolve` checked it is one).
fn struct_of(value: &model::Value) -> Struct {
    match value {
        model::Value::Json(serde_json::Value::Object(object)) => object_struct(object),
        _ => Struct::default(),
    }
}
