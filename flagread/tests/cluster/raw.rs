//! A raw gRPC client over `h2`: sends whatever bytes a test wants as the request body (a
//! well-framed message, a truncated frame, garbage) with whatever `authorization` header, and
//! reads back the gRPC status, so bad input and the auth matrix reach the servers exactly as
//! written.

use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;

/// What a call ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The `grpc-status` code, or [`STREAM_OPEN`] for a server stream that started and was
    /// still open after the wait.
    pub code: i32,
    /// The `grpc-message`, percent-decoded as far as it is ASCII.
    pub message: String,
}

/// The code recorded for a server stream that was answered and still open (no error).
pub const STREAM_OPEN: i32 = -1;

/// The gRPC frame for `payload`: uncompressed flag, big-endian length, the bytes.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Calls `path` (e.g. `/flagstream.v1.FlagAdmin/GetFlag`) on 127.0.0.1:`port` with `body` as
/// the whole request body and `authorization` as that header's value, if any. A server stream
/// that is still open `stream_wait` after its headers counts as [`STREAM_OPEN`]. Errors of the
/// connection itself (refused, reset) are returned as `Err`.
pub async fn call(
    port: u16,
    path: &str,
    authorization: Option<&str>,
    body: Vec<u8>,
    stream_wait: Duration,
) -> Result<Outcome, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (client, connection) = h2::client::Builder::new()
        .max_frame_size(1 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        exchange(client, port, path, authorization, body, stream_wait),
    )
    .await
    .unwrap_or_else(|_| Err(format!("{path}: no answer within 20 s")));
    driver.abort();
    result
}

async fn exchange(
    client: h2::client::SendRequest<Bytes>,
    port: u16,
    path: &str,
    authorization: Option<&str>,
    body: Vec<u8>,
    stream_wait: Duration,
) -> Result<Outcome, String> {
    let mut client = client.ready().await.map_err(|e| format!("ready: {e}"))?;
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let request = request.body(()).map_err(|e| e.to_string())?;
    let (response, mut send) = client
        .send_request(request, false)
        .map_err(|e| format!("send: {e}"))?;
    // Send the body in pieces the peer's flow control lets through; the server may answer
    // (and reset the stream) before taking all of it.
    let mut body = Bytes::from(body);
    let sending = async {
        while !body.is_empty() {
            send.reserve_capacity(body.len().min(1 << 20));
            let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                _ => return,
            };
            let piece = body.split_to(granted.min(body.len()));
            if send.send_data(piece, false).is_err() {
                return;
            }
        }
        let _ = send.send_data(Bytes::new(), true);
    };
    let response = tokio::select! {
        response = response => response,
        _ = async { sending.await; std::future::pending::<()>().await } => unreachable!(),
    };
    let response = response.map_err(|e| format!("response: {e}"))?;
    if let Some(outcome) = status_of(response.headers()) {
        return Ok(outcome);
    }
    let mut body = response.into_body();
    let read = async {
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("body: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| format!("trailers: {e}"))?;
        trailers
            .as_ref()
            .and_then(status_of)
            .ok_or_else(|| "no grpc-status".to_string())
    };
    match tokio::time::timeout(stream_wait, read).await {
        Ok(outcome) => outcome,
        Err(_) => Ok(Outcome {
            code: STREAM_OPEN,
            message: String::new(),
        }),
    }
}

/// The status in `headers` (trailers, or the headers of a trailers-only answer).
fn status_of(headers: &http::HeaderMap) -> Option<Outcome> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Some(Outcome { code, message })
}

fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(
                std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                16,
            )
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The name of a gRPC status code, for messages and tables.
pub fn code_name(code: i32) -> &'static str {
    match code {
        STREAM_OPEN => "STREAM_OPEN",
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "?",
    }
}
