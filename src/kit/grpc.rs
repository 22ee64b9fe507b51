//! gRPC server helpers both services use: TLS from PEM files and server
//! reflection in both protocol versions (grpcurl 1.8 speaks v1alpha).

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_reflection::server::{v1, v1alpha};

/// Why TLS could not be configured; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {what} {path}: {source}")]
pub struct TlsError {
    what: &'static str,
    path: String,
    #[source]
    source: std::io::Error,
}

/// Builds a TLS configuration from a PEM certificate chain and key, requiring
/// client certificates signed by `client_ca` when one is given.
pub fn tls_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, TlsError> {
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError {
            what,
            path: path.display().to_string(),
            source,
        })
    };
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(
        read("TLS certificate", cert)?,
        read("TLS key", key)?,
    ));
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read("client CA", ca)?));
    }
    Ok(config)
}

/// The reflection services, v1 and v1alpha, listing only `services` (full
/// names such as `flagstream.v1.FlagAdmin`) besides health and reflection
/// itself; every message type stays describable. Empty lists everything.
pub fn reflection_for(
    services: &[&str],
) -> (
    v1::ServerReflectionServer<impl v1::ServerReflection>,
    v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
) {
    let builder = || {
        // Both reflection versions are registered (and listed) by both
        // servers, so a client of either version sees the whole picture.
        let mut builder = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        if !services.is_empty() {
            builder = builder
                .with_service_name("grpc.health.v1.Health")
                .with_service_name("grpc.reflection.v1.ServerReflection")
                .with_service_name("grpc.reflection.v1alpha.ServerReflection");
            for service in services {
                builder = builder.with_service_name(*service);
            }
        }
        builder
    };
    let v1 = builder()
        .build_v1()
        .expect("the compiled-in descriptor set is valid");
    let v1alpha = builder()
        .build_v1alpha()
        .expect("the compiled-in descriptor set is valid");
    (v1, v1alpha)
}

/// A server layer that answers INVALID_ARGUMENT, instead of tonic's INTERNAL, when a request
/// cannot be decoded: bytes that are not the RPC's message, a frame cut short, or no message at
/// all. The caller sent something malformed; INTERNAL would tell it the server is at fault (and
/// make retrying clients retry). A compressed-flag set without `grpc-encoding` stays INTERNAL,
/// as the gRPC compression spec requires.
///
/// It also cuts any refusal's message to [`MAX_STATUS_MESSAGE_BYTES`]: messages quote a caller's
/// values by a short prefix (`validate::shown`), and this is the net under that rule, since a
/// status larger than a client's header limit (8 KiB by default) reaches it as
/// RESOURCE_EXHAUSTED instead of the refusal.
#[derive(Clone, Copy, Debug, Default)]
pub struct MalformedRequests;

impl<S> tower::Layer<S> for MalformedRequests {
    type Service = MalformedRequestsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MalformedRequestsService { inner }
    }
}

/// The service [`MalformedRequests`] wraps another in.
#[derive(Clone, Debug)]
pub struct MalformedRequestsService<S> {
    inner: S,
}

impl<S, R, B> tower::Service<R> for MalformedRequestsService<S>
where
    S: tower::Service<R, Response = http::Response<B>>,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = MalformedRequestsFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        MalformedRequestsFuture {
            inner: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`MalformedRequestsService`].
    pub struct MalformedRequestsFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> std::future::Future for MalformedRequestsFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.project().inner.poll(cx).map_ok(|mut response| {
            tidy_refusal(response.headers_mut());
            response
        })
    }
}

/// The longest status message either server sends, in bytes (before percent-encoding).
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// Rewrites a trailers-only INTERNAL answer whose message is one of tonic's request-decoding
/// failures into INVALID_ARGUMENT, and cuts a longer message than
/// [`MAX_STATUS_MESSAGE_BYTES`]. Answers with a body carry their status in trailers and are left
/// alone: decoding fails before any message is answered, and refusals carry no body.
fn tidy_refusal(headers: &mut http::HeaderMap) {
    let Some(code) = headers.get("grpc-status") else {
        return;
    };
    let undecodable = code.as_bytes() == b"13";
    let long = headers
        .get("grpc-message")
        .is_some_and(|m| m.len() > MAX_STATUS_MESSAGE_BYTES);
    if !undecodable && !long {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    let refusal = if undecodable && is_undecodable(status.message()) {
        tonic::Status::invalid_argument(format!(
            "malformed request: {}",
            status.message().trim_end_matches('.')
        ))
    } else if status.message().len() > MAX_STATUS_MESSAGE_BYTES {
        let mut cut = MAX_STATUS_MESSAGE_BYTES;
        while !status.message().is_char_boundary(cut) {
            cut -= 1;
        }
        tonic::Status::new(
            status.code(),
            format!("{}… (message cut)", &status.message()[..cut]),
        )
    } else {
        return;
    };
    // Cannot fail: the message is percent-encoded.
    let _ = refusal.add_header(headers);
}

/// Whether `message` is one tonic gives a request it could not decode (tonic 0.14:
/// `codec/decode.rs`, `server/grpc.rs`, and tonic-prost's codec).
fn is_undecodable(message: &str) -> bool {
    message.starts_with("failed to decode Protobuf message")
        || message.starts_with("Unexpected EOF decoding stream")
        || message.starts_with("Missing request message")
        || message.starts_with("protocol error: received message with invalid compression flag")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: tonic::Status) -> tonic::Status {
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        tidy_refusal(&mut headers);
        tonic::Status::from_header_map(&headers).unwrap()
    }

    #[test]
    fn undecodable_requests_are_invalid_arguments() {
        for message in [
            "failed to decode Protobuf message: Flag.key: invalid string value: data is not UTF-8 encoded",
            "Unexpected EOF decoding stream.",
            "Missing request message.",
            "protocol error: received message with invalid compression flag: 7 (valid flags are 0 and 1), while sending request",
        ] {
            let status = answered(tonic::Status::internal(message));
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{message}");
            assert!(
                status.message().starts_with("malformed request: "),
                "{}",
                status.message()
            );
        }
    }

    #[test]
    fn other_answers_are_left_alone() {
        let internal = answered(tonic::Status::internal("the store failed: disk on fire"));
        assert_eq!(internal.code(), tonic::Code::Internal);
        // The gRPC compression spec requires INTERNAL for this one.
        let compressed = answered(tonic::Status::internal(
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
        ));
        assert_eq!(compressed.code(), tonic::Code::Internal);
        let not_found = answered(tonic::Status::not_found(
            "failed to decode Protobuf message",
        ));
        assert_eq!(not_found.code(), tonic::Code::NotFound);
        assert_eq!(not_found.message(), "failed to decode Protobuf message");
    }

    #[test]
    fn long_messages_are_cut() {
        let status = answered(tonic::Status::not_found(format!(
            "flag \"{}\" not found",
            "é".repeat(5000)
        )));
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(status.message().len() <= MAX_STATUS_MESSAGE_BYTES + 20);
        assert!(
            status.message().ends_with("… (message cut)"),
            "{}",
            status.message()
        );
    }
}
