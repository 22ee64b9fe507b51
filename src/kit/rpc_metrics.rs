//! `flagstream_grpc_requests_total{service,method,code}`: every gRPC call a server answers,
//! counted by a tower layer around the server's routes, so no handler records anything.
//!
//! The status is read where gRPC puts it: in the response headers of a trailers-only answer
//! (every error a handler or interceptor returns at once), otherwise in the trailers at the end
//! of the body. A body dropped before its trailers (the client went away) counts as `CANCELLED`.
//!
//! Label values are bounded: `service` and `method` come from a table of the methods in the
//! compiled-in descriptor sets (flagstream, health, reflection), interned once per process, so a
//! caller inventing paths adds no series; any other path is counted as `unknown`/`unknown`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The labels of one series.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The full service name, e.g. `flagstream.v1.FlagEval`, or `unknown`.
    pub service: &'static str,
    /// The method name, e.g. `Evaluate`, or `unknown`.
    pub method: &'static str,
    /// The gRPC status code name, e.g. `OK`, `UNAUTHENTICATED`.
    pub code: &'static str,
}

/// The layer a server builder takes (`Server::builder().layer(...)`); clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct RpcMetricsLayer {
    counters: Arc<Counters>,
}

/// The counter family, registered in the service's registry, and for each known method (and one
/// slot for unknown paths) a handle to each code's counter, taken from the family on first use:
/// a call then increments an atomic, without the family's lock or hashing its labels.
#[derive(Debug)]
struct Counters {
    family: Family<RpcLabels, Counter>,
    handles: Box<[[OnceLock<Counter>; CODES.len()]]>,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            family: Family::default(),
            handles: (0..=methods().0.len())
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect(),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    counters: Arc<Counters>,
}

pin_project_lite::pin_project! {
    /// The routes' response future, handing back a [`CountedBody`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Taken when the response arrives.
        recorder: Option<Recorder>,
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its call when the trailers pass (or when it is dropped
    /// without them).
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        // `None` once the call is counted.
        recorder: Option<Recorder>,
    }
}

/// Counts one call exactly once: with the status seen, or `CANCELLED` when dropped unseen.
#[derive(Debug)]
pub struct Recorder {
    counters: Arc<Counters>,
    /// Index of the method in [`methods`] (its length for unknown paths).
    method: usize,
    done: bool,
}

/// gRPC status code names by number.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl RpcMetricsLayer {
    /// A layer with a fresh counter family, registered in `registry` as
    /// `flagstream_grpc_requests_total`.
    pub fn register(registry: &mut Registry) -> RpcMetricsLayer {
        let layer = RpcMetricsLayer::default();
        registry.register(
            "flagstream_grpc_requests",
            "gRPC calls answered, by service, method and status code",
            layer.counters.family.clone(),
        );
        layer
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            counters: self.counters.clone(),
        }
    }
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let recorder = Recorder {
            counters: self.counters.clone(),
            method: method_index(request.uri().path()),
            done: false,
        };
        ResponseFuture {
            inner: self.inner.call(request),
            recorder: Some(recorder),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut recorder = this.recorder.take();
        Poll::Ready(result.map(|response| {
            // A trailers-only answer carries its status in the headers.
            if let (Some(code), Some(r)) = (response.headers().get("grpc-status"), &mut recorder) {
                r.record(code.as_bytes());
                recorder = None;
            }
            response.map(|inner| CountedBody { inner, recorder })
        }))
    }
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(recorder) = this.recorder.as_mut() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                        recorder.record(code.as_bytes());
                        *this.recorder = None;
                    }
                }
                // An error of the body, or its end without trailers: the client saw no status.
                Some(Err(_)) | None => {
                    recorder.record(b"2");
                    *this.recorder = None;
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Recorder {
    /// Counts the call with the status `code` (its decimal digits as sent).
    fn record(&mut self, code: &[u8]) {
        let code = std::str::from_utf8(code)
            .ok()
            .and_then(|c| c.parse::<usize>().ok())
            .filter(|c| *c < CODES.len())
            .unwrap_or(UNKNOWN);
        self.count(code);
    }

    /// Counts the call with the code of index `code` in [`CODES`], once.
    fn count(&mut self, code: usize) {
        if self.done {
            return;
        }
        self.done = true;
        let counters = &*self.counters;
        counters.handles[self.method][code]
            .get_or_init(|| {
                let (service, method) = methods()
                    .0
                    .get(self.method)
                    .copied()
                    .unwrap_or(("unknown", "unknown"));
                counters
                    .family
                    .get_or_create(&RpcLabels {
                        service,
                        method,
                        code: CODES[code],
                    })
                    .clone()
            })
            .inc();
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.count(CANCELLED);
    }
}

/// Indexes into [`CODES`].
const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;

/// The known methods' `(service, method)` labels, and the index of each by request path.
type Methods = (Vec<(&'static str, &'static str)>, HashMap<String, usize>);

fn methods() -> &'static Methods {
    static METHODS: OnceLock<Methods> = OnceLock::new();
    METHODS.get_or_init(|| {
        let mut labels = Vec::new();
        let mut by_path = HashMap::new();
        for (path, names) in known_methods() {
            by_path.insert(path, labels.len());
            labels.push(names);
        }
        (labels, by_path)
    })
}

/// The index of a request path's method in [`methods`]; its length for an unknown path.
fn method_index(path: &str) -> usize {
    let (labels, by_path) = methods();
    by_path.get(path).copied().unwrap_or(labels.len())
}

/// The `(service, method)` labels of a request path, from the interned table of known methods.
#[cfg(test)]
fn method_labels(path: &str) -> (&'static str, &'static str) {
    methods()
        .0
        .get(method_index(path))
        .copied()
        .unwrap_or(("unknown", "unknown"))
}

/// Every method of every service in the compiled-in descriptor sets, keyed by its request path.
/// The names are leaked once per process: a few dozen short strings.
fn known_methods() -> HashMap<String, (&'static str, &'static str)> {
    use prost::Message;
    let sets: [&[u8]; 4] = [
        crate::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = HashMap::new();
    for set in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            let package = file.package();
            for service in &file.service {
                let full = if package.is_empty() {
                    service.name().to_string()
                } else {
                    format!("{package}.{}", service.name())
                };
                let full: &'static str = Box::leak(full.into_boxed_str());
                for method in &service.method {
                    let name: &'static str = Box::leak(method.name().to_string().into_boxed_str());
                    methods.insert(format!("/{full}/{name}"), (full, name));
                }
            }
        }
    }
    methods
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_paths() {
        assert_eq!(
            method_labels("/flagstream.v1.FlagEval/Evaluate"),
            ("flagstream.v1.FlagEval", "Evaluate")
        );
        assert_eq!(
            method_labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        assert_eq!(
            method_labels("/flagstream.v1.FlagEval/Invented"),
            ("unknown", "unknown")
        );
        assert_eq!(method_labels("/x"), ("unknown", "unknown"));
    }
}
