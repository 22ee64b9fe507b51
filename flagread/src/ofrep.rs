//! OFREP, the OpenFeature Remote Evaluation Protocol (open-feature/protocol,
//! `service/openapi.yaml`), on flagread's own HTTP/1.1 port, so the OFREP providers evaluate
//! flagstream flags unchanged.
//!
//! - `POST /ofrep/v1/evaluate/flags/{key}` evaluates one flag (the key percent-decoded, so
//!   `a%2Fb` names `a/b`); `POST /ofrep/v1/evaluate/flags` evaluates every flag of the namespace.
//!   The body is `{"context": {...}}`; an empty body, a missing or null context is an empty
//!   context. The body's `Content-Type` is not checked: browsers' `fetch` sends a string body as
//!   `text/plain`.
//! - The namespace, tokens and context are the flagd front end's ([`crate::openfeature`]):
//!   `flagd-selector`, `Authorization: Bearer <token>` (anonymous namespaces without one), the
//!   same context mapping, `minRevision` in the context or the `flagstream-min-revision` header.
//!   OFREP has no deadline header, so a `minRevision` wait lasts at most [`REVISION_WAIT`].
//! - 200: `{key, reason, variant, value, metadata}` (metadata: the flag's, plus `flagSetId` and
//!   `revision`). A NUMBER flag's value is written as a float (`20.0`), so typed SDKs read a
//!   float; a JSON flag's value is any JSON value.
//! - Errors: 400 `{key, errorCode, errorDetails}` (`PARSE_ERROR` for a body that is not
//!   `{"context": {...}}` JSON or is over [`validate::MAX_REQUEST_BYTES`], `INVALID_CONTEXT` for
//!   a context, selector or `minRevision` the replica cannot use); 404 `{key, errorCode:
//!   FLAG_NOT_FOUND, errorDetails}`; 401 and 403 without a body; 429 without a body and with
//!   `Retry-After` (seconds) when the concurrency limit or the bound on `minRevision` waits
//!   refuses the call; 500 `{errorDetails}` for a flag that cannot be evaluated (with
//!   `key` and `errorCode: GENERAL` as well, which the spec allows and the providers turn into
//!   a GENERAL error carrying the details); 503 with `Retry-After` and the same body when the
//!   replica holds no state yet or `minRevision` was not reached in time (the spec has no
//!   status for a replica that cannot answer yet; 503 is HTTP's).
//! - Bulk: `{flags: [...], metadata: {flagSetId, revision}}`, a flag that cannot be evaluated
//!   listed as `{key, errorCode: GENERAL, errorDetails}`; a namespace the replica does not hold
//!   has no flags (as flagd's `ResolveAll`). The `ETag` is a hash of the answer, which is
//!   derived from the revision (in its metadata) and the context (through the results): it
//!   changes exactly when the answer does, also when a date constraint starts to hold with no
//!   write at all, which a tag computed from the revision and the context alone would miss.
//!   `If-None-Match` naming it answers 304 without a body. `Access-Control-Expose-Headers: ETag`
//!   is always sent with it.
//! - CORS only for `--ofrep-cors-origins` (`*` for any); without it no CORS headers at all, and
//!   preflight requests are refused (405).
//! - Bounds: a request's head must arrive within [`HEADER_READ_TIMEOUT`] (so an idle keep-alive
//!   connection is closed after it), its body within [`BODY_READ_TIMEOUT`]; a call takes one of
//!   FlagEval's concurrency permits only to evaluate, and a `minRevision` wait one of its bounded
//!   wait slots; bulk evaluations of more than [`INLINE_FLAGS`] flags run on the blocking pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use axum::routing::post;
use flagstream::convert;
use flagstream::engine::CompiledFlag;
use flagstream::model;
use flagstream::pb;
use flagstream::validate;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::openfeature::{
    self, Access, Caller, MIN_REVISION_HEADER, Mapped, OpenFeatureError, Outcome, SELECTOR_HEADER,
};
use crate::service::{EvalError, EvalService, namespace_of};
use crate::state::Replica;

/// The single-flag evaluation route.
pub const FLAG_PATH: &str = "/ofrep/v1/evaluate/flags/{key}";

/// The bulk evaluation route.
pub const BULK_PATH: &str = "/ofrep/v1/evaluate/flags";

/// The longest `minRevision` wait of an OFREP call. OFREP has no deadline header; this is below
/// the Python OFREP provider's default request timeout (5 s), so the caller gets the answer (503)
/// rather than its own timeout.
pub const REVISION_WAIT: Duration = Duration::from_secs(4);

/// The `Retry-After` of a 429 or 503, in seconds: load is shed per call, and a replica catches up
/// within moments, so a second is enough for the caller to retry (here or on another replica).
pub const RETRY_AFTER_S: u64 = 1;

/// How long a client may take to send a request's head, counted from when the connection
/// starts waiting for it, so also how long an idle keep-alive connection stays open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request's body may take to arrive once its head has.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Namespaces with more flags than this are evaluated in bulk on the blocking pool, not on the
/// async workers.
pub const INLINE_FLAGS: usize = 256;

/// What the OFREP handlers share.
#[derive(Clone)]
pub struct OfrepService {
    /// The FlagEval service whose state, bounds and metrics OFREP shares.
    eval: EvalService,
    /// Who may read which namespace, and the default namespace.
    access: Arc<Access>,
    /// Requests answered, by route and status.
    requests: Arc<Requests>,
}

/// `flagread_ofrep_requests_total{route, status}`: each counter taken once, so that counting a
/// request is one atomic add (no lock, no hashing of labels).
#[derive(Debug)]
pub struct Requests {
    /// `[route][status]`, in the order of [`ROUTES`] and [`STATUSES`].
    counters: [[Counter; STATUSES.len()]; ROUTES.len()],
}

/// The route labels: the single-flag and the bulk evaluation.
const ROUTES: [&str; 2] = ["flag", "bulk"];

/// The status labels; any other status is counted as `other`. [`Requests::count`] maps a
/// status to its index here.
const STATUSES: [&str; 10] = [
    "200", "304", "400", "401", "403", "404", "429", "500", "503", "other",
];

/// Why an OFREP call is refused, and how the answer says it.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    /// OpenFeature's error code; `None` for answers without a body (401, 403, 429).
    code: Option<&'static str>,
    details: String,
}

impl Requests {
    /// Registers the family in `registry` and takes every counter of it once.
    pub fn register(registry: &mut Registry) -> Arc<Requests> {
        let family = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register(
            "flagread_ofrep_requests",
            "OFREP evaluation requests answered, by route and HTTP status",
            family.clone(),
        );
        let counters = ROUTES.map(|route| {
            STATUSES.map(|status| {
                family
                    .get_or_create(&vec![("route", route), ("status", status)])
                    .clone()
            })
        });
        Arc::new(Requests { counters })
    }

    fn count(&self, route: usize, status: StatusCode) {
        let index = match status.as_u16() {
            200 => 0,
            304 => 1,
            400 => 2,
            401 => 3,
            403 => 4,
            404 => 5,
            429 => 6,
            500 => 7,
            503 => 8,
            _ => 9,
        };
        self.counters[route][index].inc();
    }
}

/// The CORS layer for `origins` (`*` for any), `None` when empty; an origin that is not a
/// valid header value is refused, naming it.
pub fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    let origins: Vec<&str> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).map_err(|_| format!("{o:?} is not a valid origin")))
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(values)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::IF_NONE_MATCH,
                HeaderName::from_static(SELECTOR_HEADER),
                HeaderName::from_static(MIN_REVISION_HEADER),
            ])
            .expose_headers([header::ETAG, header::RETRY_AFTER])
            .max_age(Duration::from_secs(3600)),
    ))
}

/// Serves `router` on `listener` (HTTP/1.1) until `shutdown` completes, then stops accepting,
/// closes idle connections and returns once the calls in flight are answered. The caller bounds
/// that wait (the drain's deadline).
///
/// A connection is closed when a request's head takes longer than [`HEADER_READ_TIMEOUT`]
/// (idle keep-alive time included), so slow or idle clients hold no connection for long.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, shutdown: impl Future) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                // Accept errors (e.g. out of file descriptors) are transient; back off briefly
                // rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small answers must not wait for Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service));
        // Exit: when the client closes the connection, a head times out, or at shutdown once
        // its call in flight is answered.
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

impl OfrepService {
    /// OFREP over `eval`'s state, as `access` allows, counting requests in `requests`.
    pub fn new(eval: EvalService, access: Arc<Access>, requests: Arc<Requests>) -> OfrepService {
        OfrepService {
            eval,
            access,
            requests,
        }
    }

    /// The two routes, with CORS for `cors_origins` (see [`cors_layer`]).
    pub fn router(self, cors_origins: &[String]) -> Result<Router, String> {
        let router = Router::new()
            .route(BULK_PATH, post(evaluate_all))
            .route(FLAG_PATH, post(evaluate_flag))
            .with_state(self);
        Ok(match cors_layer(cors_origins)? {
            Some(cors) => router.layer(cors),
            None => router,
        })
    }

    /// The caller and the namespace it reads, from the request's headers.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, OpenFeatureError> {
        let header = |name: &str| headers.get(name).map(HeaderValue::as_bytes);
        self.access
            .admit(header(SELECTOR_HEADER), header("authorization"))
    }

    /// Evaluates flag `key`.
    async fn flag(&self, key: &str, headers: &HeaderMap, body: Body) -> Result<Response, Failure> {
        let caller = self.caller(headers)?;
        let mapped = read_context(headers, body).await?;
        let min_revision = openfeature::min_revision(
            headers.get(MIN_REVISION_HEADER).map(|v| v.as_bytes()),
            &mapped,
        )?;
        let replica = self
            .eval
            .replica_for(caller.token(), REVISION_WAIT, min_revision)
            .await?;
        let _permit = self.eval.admit()?;
        let not_found = || OpenFeatureError::FlagNotFound {
            namespace: caller.namespace.clone(),
            flag: key.to_string(),
        };
        let ns = namespace_of(&replica, &caller.namespace, self.eval.metrics())
            .map_err(|_| not_found())?;
        let flag = ns.flags.get(key).ok_or_else(not_found)?;
        let ctx = convert::context(&mapped.context);
        let started = Instant::now();
        let (evaluation, _) = EvalService::evaluate_counted(ns, Some(flag), &ctx);
        self.eval.metrics().eval_latency.observe(started.elapsed());
        let outcome = openfeature::outcome(flag, &evaluation)?;
        let mut body = Vec::with_capacity(256);
        write_success(
            &mut body,
            key,
            &outcome,
            flag,
            &caller.namespace,
            replica.revision,
        );
        Ok(json(StatusCode::OK, body))
    }

    /// Evaluates every flag of the caller's namespace.
    async fn all(&self, headers: &HeaderMap, body: Body) -> Result<Response, Failure> {
        let caller = self.caller(headers)?;
        let mapped = read_context(headers, body).await?;
        let min_revision = openfeature::min_revision(
            headers.get(MIN_REVISION_HEADER).map(|v| v.as_bytes()),
            &mapped,
        )?;
        let replica = self
            .eval
            .replica_for(caller.token(), REVISION_WAIT, min_revision)
            .await?;
        let _permit = self.eval.admit()?;
        let replica = arc_swap::Guard::into_inner(replica);
        let size = namespace_of(&replica, &caller.namespace, self.eval.metrics())
            .map_or(0, |ns| ns.flags.len());
        let namespace = caller.namespace;
        let render = move || bulk_body(&replica, &namespace, &mapped.context);
        let (body, elapsed) = if size > INLINE_FLAGS {
            tokio::task::spawn_blocking(render)
                .await
                .map_err(|e| Failure::general(format!("the bulk evaluation failed: {e}")))?
        } else {
            render()
        };
        if let Some(elapsed) = elapsed {
            self.eval.metrics().eval_latency.observe(elapsed);
        }
        let etag = etag(&body);
        let expose = HeaderValue::from_static("ETag");
        let mut response = if matches(headers, &etag) {
            empty(StatusCode::NOT_MODIFIED)
        } else {
            json(StatusCode::OK, body)
        };
        let headers = response.headers_mut();
        headers.insert(header::ETAG, etag);
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose);
        Ok(response)
    }
}

async fn evaluate_flag(
    State(ofrep): State<OfrepService>,
    key: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = match key {
        Ok(Path(key)) => match ofrep.flag(&key, &headers, body).await {
            Ok(response) => response,
            Err(failure) => failure.answer(Some(&key)),
        },
        Err(rejection) => Failure {
            status: StatusCode::BAD_REQUEST,
            code: Some("PARSE_ERROR"),
            details: format!("flag key: {rejection}"),
        }
        .answer(Some("")),
    };
    ofrep.requests.count(0, response.status());
    response
}

async fn evaluate_all(
    State(ofrep): State<OfrepService>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = match ofrep.all(&headers, body).await {
        Ok(response) => response,
        Err(failure) => failure.answer(None),
    };
    ofrep.requests.count(1, response.status());
    response
}

impl Failure {
    fn parse(details: String) -> Failure {
        Failure {
            status: StatusCode::BAD_REQUEST,
            code: Some("PARSE_ERROR"),
            details,
        }
    }

    fn general(details: String) -> Failure {
        Failure {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: Some("GENERAL"),
            details,
        }
    }

    /// The answer: a body `{key, errorCode, errorDetails}` (no `key` for bulk calls, `key`
    /// `None`) unless the status has none; `Retry-After` on 429 and 503.
    fn answer(self, key: Option<&str>) -> Response {
        let mut response = match self.code {
            None => empty(self.status),
            Some(code) => {
                let mut body = Vec::with_capacity(64 + self.details.len());
                write_failure(&mut body, key, code, &self.details);
                json(self.status, body)
            }
        };
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        response
    }
}

impl From<OpenFeatureError> for Failure {
    fn from(error: OpenFeatureError) -> Failure {
        use StatusCode as S;
        let details = error.to_string();
        let (status, code) = match error {
            OpenFeatureError::Selector(_) | OpenFeatureError::Context(_) => {
                (S::BAD_REQUEST, Some("INVALID_CONTEXT"))
            }
            OpenFeatureError::TokenRequired(_) | OpenFeatureError::Unauthenticated(_) => {
                (S::UNAUTHORIZED, None)
            }
            OpenFeatureError::PermissionDenied { .. } => (S::FORBIDDEN, None),
            OpenFeatureError::FlagNotFound { .. } => (S::NOT_FOUND, Some("FLAG_NOT_FOUND")),
            // OFREP asks for no type, so these do not arise here; were one to, the caller asked
            // for something the flag cannot give.
            OpenFeatureError::TypeMismatch { .. }
            | OpenFeatureError::NotAnObject { .. }
            | OpenFeatureError::NotAnInteger { .. } => (S::BAD_REQUEST, Some("TYPE_MISMATCH")),
            OpenFeatureError::Evaluation { .. } => (S::INTERNAL_SERVER_ERROR, Some("GENERAL")),
            OpenFeatureError::Replica(error) => match error {
                EvalError::NamespaceNotFound(_) | EvalError::FlagNotFound { .. } => {
                    (S::NOT_FOUND, Some("FLAG_NOT_FOUND"))
                }
                EvalError::TypeMismatch { .. } => (S::BAD_REQUEST, Some("TYPE_MISMATCH")),
                EvalError::UnknownType(_) => (S::BAD_REQUEST, Some("GENERAL")),
                // A minRevision beyond the writer's head is the caller's: it will not come.
                EvalError::Limit { .. }
                | EvalError::Context(_)
                | EvalError::RevisionBeyondHead { .. } => (S::BAD_REQUEST, Some("INVALID_CONTEXT")),
                EvalError::RevisionNotReached { .. } | EvalError::NotReady(_) => {
                    (S::SERVICE_UNAVAILABLE, Some("GENERAL"))
                }
                EvalError::Held(_) | EvalError::Overloaded(_) => (S::TOO_MANY_REQUESTS, None),
            },
        };
        Failure {
            status,
            code,
            details,
        }
    }
}

impl From<EvalError> for Failure {
    fn from(error: EvalError) -> Failure {
        OpenFeatureError::from(error).into()
    }
}

/// The request's context, mapped: `{"context": {...}}`, where an empty body, a missing or a
/// null context is an empty context.
async fn read_context(headers: &HeaderMap, body: Body) -> Result<Mapped, Failure> {
    let limit = validate::MAX_REQUEST_BYTES;
    let too_large = || Failure::parse(format!("the request body is over {limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let bytes = tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            Failure::parse(format!(
                "the request body did not arrive within {BODY_READ_TIMEOUT:?}"
            ))
        })?
        .map_err(|_| too_large())?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Mapped::default());
    }
    let body: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::parse(format!("the request body is not JSON: {e}")))?;
    let serde_json::Value::Object(body) = body else {
        return Err(Failure::parse(
            "the request body must be an object: {\"context\": {...}}".into(),
        ));
    };
    match body.get("context") {
        None | Some(serde_json::Value::Null) => Ok(Mapped::default()),
        Some(serde_json::Value::Object(context)) => Ok(openfeature::map_context(context.iter())?),
        Some(_) => Err(OpenFeatureError::Context("context: must be an object".into()).into()),
    }
}

/// The bulk answer for `namespace` of `replica` and the time its evaluations took (`None` when
/// the replica does not hold the namespace).
fn bulk_body(
    replica: &Replica,
    namespace: &str,
    context: &pb::Context,
) -> (Vec<u8>, Option<Duration>) {
    let ns = replica.namespaces.get(namespace);
    // A result is typically 100–150 bytes.
    let mut out = Vec::with_capacity(64 + ns.map_or(0, |ns| ns.flags.len()) * 160);
    out.extend_from_slice(b"{\"flags\":[");
    let mut elapsed = None;
    if let Some(ns) = ns {
        let ctx = convert::context(context);
        let started = Instant::now();
        for (i, flag) in ns.flags.flags().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let (evaluation, _) = EvalService::evaluate_counted(ns, Some(flag), &ctx);
            match openfeature::outcome(flag, &evaluation) {
                Ok(outcome) => write_success(
                    &mut out,
                    flag.key(),
                    &outcome,
                    flag,
                    namespace,
                    replica.revision,
                ),
                Err(error) => {
                    write_failure(&mut out, Some(flag.key()), "GENERAL", &error.to_string())
                }
            }
        }
        elapsed = Some(started.elapsed());
    }
    out.extend_from_slice(b"],\"metadata\":{\"flagSetId\":");
    write_str(&mut out, namespace);
    out.extend_from_slice(b",\"revision\":");
    out.extend_from_slice(replica.revision.to_string().as_bytes());
    out.extend_from_slice(b"}}");
    (out, elapsed)
}

/// The entity tag of a bulk answer: a hash of its bytes (which hold the revision).
fn etag(body: &[u8]) -> HeaderValue {
    let hash = ring::digest::digest(&ring::digest::SHA256, body);
    let tag = format!("\"{}\"", flagstream::digest::hex(&hash.as_ref()[..16]));
    HeaderValue::from_str(&tag).expect("hex digits and quotes are a valid header value")
}

/// Whether `If-None-Match` names `etag` (or is `*`), comparing weakly as RFC 9110 says.
fn matches(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let etag = etag.as_bytes();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == etag)
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn empty(status: StatusCode) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

// ---------------------------------------------------------------------------
// JSON, written straight into the answer's buffer.

/// `{"key":…,"reason":…,"variant":…,"value":…,"metadata":{…}}`.
fn write_success(
    out: &mut Vec<u8>,
    key: &str,
    outcome: &Outcome<'_>,
    flag: &CompiledFlag,
    namespace: &str,
    revision: u64,
) {
    out.extend_from_slice(b"{\"key\":");
    write_str(out, key);
    out.extend_from_slice(b",\"reason\":\"");
    out.extend_from_slice(outcome.reason.as_bytes());
    out.extend_from_slice(b"\",\"variant\":");
    write_str(out, outcome.variant);
    out.extend_from_slice(b",\"value\":");
    write_value(out, outcome.value);
    out.extend_from_slice(b",\"metadata\":{");
    for (name, value) in flag.metadata().iter() {
        // Ours win over the flag's own of the same name, as in the flagd front end.
        if name == "flagSetId" || name == "revision" {
            continue;
        }
        write_str(out, name);
        out.push(b':');
        write_str(out, value);
        out.push(b',');
    }
    out.extend_from_slice(b"\"flagSetId\":");
    write_str(out, namespace);
    out.extend_from_slice(b",\"revision\":");
    out.extend_from_slice(revision.to_string().as_bytes());
    out.extend_from_slice(b"}}");
}

/// `{"key":…,"errorCode":…,"errorDetails":…}`, without `key` when `None`.
fn write_failure(out: &mut Vec<u8>, key: Option<&str>, code: &str, details: &str) {
    out.push(b'{');
    if let Some(key) = key {
        out.extend_from_slice(b"\"key\":");
        write_str(out, key);
        out.push(b',');
    }
    out.extend_from_slice(b"\"errorCode\":");
    write_str(out, code);
    out.extend_from_slice(b",\"errorDetails\":");
    write_str(out, details);
    out.push(b'}');
}

/// A served value: a NUMBER as a float (`20.0`: serde_json writes every `f64` with a fraction or
/// an exponent), so that a typed SDK reads a whole number as the float it is.
fn write_value(out: &mut Vec<u8>, value: &model::Value) {
    // Writing to a Vec cannot fail, and JSON values here have string keys.
    match value {
        model::Value::Bool(true) => out.extend_from_slice(b"true"),
        model::Value::Bool(false) => out.extend_from_slice(b"false"),
        model::Value::String(s) => write_str(out, s),
        model::Value::Number(n) => {
            let _ = serde_json::to_writer(&mut *out, n);
        }
        model::Value::Json(json) => {
            let _ = serde_json::to_writer(&mut *out, json);
        }
    }
}

/// A JSON string.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(value: model::Value) -> String {
        let mut out = Vec::new();
        write_value(&mut out, &value);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn numbers_are_written_as_floats_and_json_as_it_is() {
        assert_eq!(value(model::Value::Number(20.0)), "20.0");
        assert_eq!(value(model::Value::Number(0.0)), "0.0");
        assert_eq!(value(model::Value::Number(-1.5)), "-1.5");
        assert_eq!(value(model::Value::Number(1e20)), "1e+20");
        assert_eq!(value(model::Value::Bool(false)), "false");
        assert_eq!(value(model::Value::String("a\"b".into())), r#""a\"b""#);
        assert_eq!(
            value(model::Value::Json(serde_json::json!([1, {"a": null}]))),
            r#"[1,{"a":null}]"#
        );
    }

    #[test]
    fn if_none_match_compares_weakly_and_accepts_lists_and_any() {
        let etag = HeaderValue::from_static("\"abc\"");
        let check = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(value).unwrap());
            matches(&headers, &etag)
        };
        assert!(check("\"abc\""));
        assert!(check("W/\"abc\""));
        assert!(check("\"x\", \"abc\""));
        assert!(check("*"));
        assert!(!check("\"abcd\""));
        assert!(!check("abc"));
        assert!(!matches(&HeaderMap::new(), &etag));
    }

    #[test]
    fn cors_origins_are_checked() {
        assert!(cors_layer(&[]).unwrap().is_none());
        assert!(cors_layer(&[String::new()]).unwrap().is_none());
        assert!(cors_layer(&["*".into()]).unwrap().is_some());
        assert!(
            cors_layer(&["https://app.example".into()])
                .unwrap()
                .is_some()
        );
        assert!(cors_layer(&["bad\norigin".into()]).is_err());
    }
}
