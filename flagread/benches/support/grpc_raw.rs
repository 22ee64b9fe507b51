//! gRPC without generated code: a prost codec, a bytes codec, the bare unary
//! echo server the read path is compared with, and a client that sends a
//! pre-encoded request body and checks that the answer has grpc-status 0.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::net::SocketAddr;

use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::transport::Channel;

/// The message echoed: one opaque payload.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoMessage {
    #[prost(bytes = "vec", tag = "1")]
    pub payload: Vec<u8>,
}

/// The gRPC path of the echo method.
pub const ECHO_PATH: &str = "/bench.Echo/Echo";

/// Encodes `T` and decodes `U` with prost, as generated services do.
pub struct ProstCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        ProstCodec(PhantomData)
    }
}

pub struct ProstEncoder<T>(PhantomData<T>);
pub struct ProstDecoder<U>(PhantomData<U>);

impl<T: Message + Send + 'static, U: Message + Default + Send + 'static> Codec
    for ProstCodec<T, U>
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstEncoder(PhantomData)
    }

    fn decoder(&mut self) -> ProstDecoder<U> {
        ProstDecoder(PhantomData)
    }
}

impl<T: Message> Encoder for ProstEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|error| Status::internal(error.to_string()))
    }
}

impl<U: Message + Default> Decoder for ProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|error| Status::internal(error.to_string()))
    }
}

/// Sends and receives message bodies as bytes, untouched.
#[derive(Default)]
pub struct BytesCodec;

pub struct BytesEncoder;
pub struct BytesDecoder;

impl Codec for BytesCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = BytesEncoder;
    type Decoder = BytesDecoder;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> BytesDecoder {
        BytesDecoder
    }
}

impl Encoder for BytesEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for BytesDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// The echo method: answers with the message it was sent.
#[derive(Clone)]
struct EchoMethod;

impl tonic::server::UnaryService<EchoMessage> for EchoMethod {
    type Response = EchoMessage;
    type Future = BoxFuture<tonic::Response<EchoMessage>, Status>;

    fn call(&mut self, request: tonic::Request<EchoMessage>) -> Self::Future {
        Box::pin(async move { Ok(tonic::Response::new(request.into_inner())) })
    }
}

/// The whole echo service, routed by path like a generated server.
#[derive(Clone)]
pub struct EchoServer;

impl tonic::server::NamedService for EchoServer {
    const NAME: &'static str = "bench.Echo";
}

impl<B> Service<http::Request<B>> for EchoServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != ECHO_PATH {
            return Box::pin(async {
                Ok(Status::unimplemented("only Echo is served").into_http())
            });
        }
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<EchoMessage, EchoMessage>::default());
            Ok(grpc.unary(EchoMethod, request).await)
        })
    }
}

/// Serves the echo service on `addr` until the process is killed, on a
/// default multi-threaded runtime (the same shape as flagread's).
pub fn serve_echo(addr: SocketAddr) {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    runtime.block_on(async move {
        tonic::transport::Server::builder()
            .add_service(EchoServer)
            .serve(addr)
            .await
            .expect("the echo server runs");
    });
}

/// Sends one request whose body is `body` (already protobuf-encoded) to
/// `path`, with `authorization: Bearer <secret>` when given, and returns the
/// response body; an error for any grpc-status other than 0.
pub async fn call_raw(
    channel: Channel,
    path: &str,
    body: Vec<u8>,
    secret: Option<&str>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| Status::unavailable(error.to_string()))?;
    let mut request = tonic::Request::new(body);
    if let Some(secret) = secret {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {secret}").parse().expect("ASCII token"),
        );
    }
    let path = http::uri::PathAndQuery::try_from(path).expect("a gRPC path is a valid URI path");
    grpc.unary(request, path, BytesCodec)
        .await
        .map(|response| response.into_inner())
}

/// A gRPC frame: the 5-byte prefix (not compressed, big-endian length) and the body.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}
