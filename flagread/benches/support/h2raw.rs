//! A minimal HTTP/2 client connection for the paced load generator: just
//! enough of RFC 9113 to send one pre-encoded gRPC request many times and
//! tell when each answer is complete.
//!
//! The `h2` crate cost the generator about 12 µs of CPU per call here (a task
//! per stream, HPACK both ways, several wake-ups): at the 86,000 calls/s the
//! echo server was paced at, the whole load CPU, so the generator rather than
//! the server set the tail. With this client it is about 8 µs. This client writes each request as two
//! prebuilt frames (HEADERS with literal HPACK fields, never indexed, so no
//! state; DATA with END_STREAM), batches a connection's due requests into one
//! `write`, and reads answers by frame type and flags only: it never decodes
//! the server's HPACK. A call counts as answered when its stream ends (a
//! HEADERS frame with END_STREAM: the trailers) after exactly the expected
//! number of DATA bytes. gRPC puts an error in trailers after no message at
//! all, so a failed call, whatever its status, shows up as a wrong length.
//!
//! Flow control: the client grants the server the largest windows (stream and
//! connection) up front and tops the connection window up as it reads; it
//! honours the server's connection window and stream limit for what it sends,
//! queueing requests locally (their latency still counts from when they were
//! due). SETTINGS and PING are acknowledged; GOAWAY or RST_STREAM fail the
//! calls they end.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const MAX_WINDOW: u32 = (1 << 31) - 1;
/// HTTP/2's default initial window and frame size.
const DEFAULT_WINDOW: i64 = 65_535;

/// How one call ended: when it was due, when its frames were queued for the
/// socket, when its stream ended, and whether it was answered whole.
pub struct Finished {
    pub due: Instant,
    pub sent: Instant,
    pub done: Instant,
    pub result: Result<(), String>,
}

/// The request every call of a connection sends, prebuilt.
pub struct Request {
    /// HEADERS frame payload (HPACK, literal fields only).
    header_block: Vec<u8>,
    /// DATA frame payload: the gRPC frame.
    body: Vec<u8>,
    /// Answer body length (gRPC prefix included) that means success.
    pub response_len: usize,
}

impl Request {
    pub fn new(
        authority: &str,
        path: &str,
        authorization: Option<&str>,
        body: Vec<u8>,
        response_len: usize,
    ) -> Request {
        let mut block = Vec::new();
        // RFC 7541 static table: 3 is `:method: POST`, 6 is `:scheme: http`.
        block.extend_from_slice(&[0x83, 0x86]);
        // Literal without indexing, name from the static table (4-bit index).
        literal_indexed_name(&mut block, 4, path); // :path
        literal_indexed_name(&mut block, 1, authority); // :authority
        literal_indexed_name(&mut block, 31, "application/grpc"); // content-type
        literal_new_name(&mut block, "te", "trailers");
        if let Some(value) = authorization {
            literal_indexed_name(&mut block, 23, value); // authorization
        }
        assert!(body.len() <= 16_384, "the request must fit one DATA frame");
        Request {
            header_block: block,
            body,
            response_len,
        }
    }
}

fn hpack_int(out: &mut Vec<u8>, prefix_bits: u8, first: u8, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn hpack_string(out: &mut Vec<u8>, value: &str) {
    hpack_int(out, 7, 0, value.len());
    out.extend_from_slice(value.as_bytes());
}

fn literal_indexed_name(out: &mut Vec<u8>, index: usize, value: &str) {
    hpack_int(out, 4, 0, index);
    hpack_string(out, value);
}

fn literal_new_name(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    hpack_string(out, name);
    hpack_string(out, value);
}

fn frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    assert!(len < 1 << 24, "frame too large");
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// A call in flight: when it was due and sent, and its answer bytes so far.
struct Open {
    stream: u32,
    due: Instant,
    sent: Instant,
    received: usize,
}

/// State shared by a connection's writer and reader tasks.
struct State {
    /// Due calls not yet sent.
    queue: VecDeque<Instant>,
    /// Calls sent, oldest (lowest stream id) first.
    open: VecDeque<Open>,
    next_stream: u32,
    /// What the server lets us send.
    max_streams: usize,
    send_window: i64,
    /// Frames the reader wants written (acknowledgements, window updates).
    control: Vec<u8>,
    /// Set when the connection failed; every call after fails with it.
    broken: Option<String>,
}

/// One HTTP/2 connection. Calls are handed in with [`Connection::submit`];
/// finished calls go to `finished`.
pub struct Connection {
    state: Rc<RefCell<State>>,
    wake_writer: Rc<Notify>,
    finished: Rc<RefCell<Vec<Finished>>>,
}

impl Connection {
    /// Connects, sends the preface and settings, and starts the connection's
    /// writer and reader as local tasks.
    pub async fn open(
        addr: SocketAddr,
        request: Rc<Request>,
        finished: Rc<RefCell<Vec<Finished>>>,
    ) -> Connection {
        let tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|error| panic!("connect to {addr}: {error}"));
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let (read, mut write) = tcp.into_split();
        let mut hello = PREFACE.to_vec();
        // SETTINGS_ENABLE_PUSH = 0, SETTINGS_INITIAL_WINDOW_SIZE = max.
        frame_head(&mut hello, 12, SETTINGS, 0, 0);
        hello.extend_from_slice(&[0, 2, 0, 0, 0, 0, 0, 4]);
        hello.extend_from_slice(&MAX_WINDOW.to_be_bytes());
        window_update(&mut hello, 0, MAX_WINDOW - DEFAULT_WINDOW as u32);
        write
            .write_all(&hello)
            .await
            .unwrap_or_else(|error| panic!("HTTP/2 preface to {addr}: {error}"));
        let state = Rc::new(RefCell::new(State {
            queue: VecDeque::new(),
            open: VecDeque::new(),
            next_stream: 1,
            // Until the server's SETTINGS say otherwise (RFC 9113 §6.5.2:
            // unlimited; be modest).
            max_streams: 100,
            send_window: DEFAULT_WINDOW,
            control: Vec::new(),
            broken: None,
        }));
        let wake_writer = Rc::new(Notify::new());
        tokio::task::spawn_local(writer(
            write,
            Rc::clone(&state),
            Rc::clone(&wake_writer),
            Rc::clone(&request),
        ));
        tokio::task::spawn_local(reader(
            read,
            Rc::clone(&state),
            Rc::clone(&wake_writer),
            request,
            Rc::clone(&finished),
        ));
        Connection {
            state,
            wake_writer,
            finished,
        }
    }

    /// Queues a call that was due at `due` (or fails it at once if the
    /// connection is broken).
    pub fn submit(&self, due: Instant) {
        let mut state = self.state.borrow_mut();
        state.queue.push_back(due);
        if let Some(failure) = state.broken.clone() {
            break_connection(&mut state, &self.finished, failure);
        }
        self.wake_writer.notify_one();
    }
}

fn window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    frame_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&increment.to_be_bytes());
}

async fn writer(
    mut write: OwnedWriteHalf,
    state: Rc<RefCell<State>>,
    wake: Rc<Notify>,
    request: Rc<Request>,
) {
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        wake.notified().await;
        {
            let mut state = state.borrow_mut();
            if state.broken.is_some() {
                return;
            }
            out.append(&mut state.control);
            let now = Instant::now();
            let cost = request.body.len() as i64;
            while state.open.len() < state.max_streams && state.send_window >= cost {
                let Some(due) = state.queue.pop_front() else {
                    break;
                };
                let stream = state.next_stream;
                state.next_stream += 2;
                state.send_window -= cost;
                frame_head(
                    &mut out,
                    request.header_block.len(),
                    HEADERS,
                    END_HEADERS,
                    stream,
                );
                out.extend_from_slice(&request.header_block);
                frame_head(&mut out, request.body.len(), DATA, END_STREAM, stream);
                out.extend_from_slice(&request.body);
                state.open.push_back(Open {
                    stream,
                    due,
                    sent: now,
                    received: 0,
                });
            }
        }
        if out.is_empty() {
            continue;
        }
        if let Err(error) = write.write_all(&out).await {
            state.borrow_mut().broken = Some(format!("write: {error}"));
            return;
        }
        out.clear();
    }
}

async fn reader(
    mut read: OwnedReadHalf,
    state: Rc<RefCell<State>>,
    wake_writer: Rc<Notify>,
    request: Rc<Request>,
    finished: Rc<RefCell<Vec<Finished>>>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut start = 0;
    // Connection-window bytes received since the last WINDOW_UPDATE.
    let mut unacknowledged: u64 = 0;
    let failure = loop {
        // Parse every whole frame in the buffer.
        let mut wake = false;
        while buf.len() - start >= 9 {
            let head = &buf[start..start + 9];
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            if buf.len() - start < 9 + len {
                break;
            }
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & MAX_WINDOW;
            let payload = &buf[start + 9..start + 9 + len];
            let mut state = state.borrow_mut();
            match kind {
                DATA => {
                    unacknowledged += len as u64;
                    if let Some(open) = state.open.iter_mut().find(|o| o.stream == stream) {
                        open.received += len;
                    }
                    if flags & END_STREAM != 0 {
                        end_stream(&mut state, stream, &request, &finished, None);
                        wake = true;
                    }
                }
                HEADERS if flags & END_STREAM != 0 => {
                    end_stream(&mut state, stream, &request, &finished, None);
                    wake = true;
                }
                RST_STREAM => {
                    let code = payload
                        .get(..4)
                        .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                    let reason = format!("RST_STREAM error code {code}");
                    end_stream(&mut state, stream, &request, &finished, Some(reason));
                    wake = true;
                }
                SETTINGS if flags & ACK == 0 => {
                    for setting in payload.chunks_exact(6) {
                        let id = u16::from_be_bytes([setting[0], setting[1]]);
                        let value =
                            u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                        if id == 3 {
                            state.max_streams = value as usize;
                        }
                    }
                    frame_head(&mut state.control, 0, SETTINGS, ACK, 0);
                    wake = true;
                }
                PING if flags & ACK == 0 => {
                    frame_head(&mut state.control, 8, PING, ACK, 0);
                    state.control.extend_from_slice(payload);
                    wake = true;
                }
                WINDOW_UPDATE if stream == 0 && len == 4 => {
                    let increment =
                        u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                            & MAX_WINDOW;
                    state.send_window += i64::from(increment);
                    wake = true;
                }
                GOAWAY => {
                    break_connection(&mut state, &finished, "GOAWAY from the server".to_string());
                    wake = true;
                }
                _ => {}
            }
            start += 9 + len;
        }
        if unacknowledged >= 1 << 30 {
            let mut state = state.borrow_mut();
            window_update(&mut state.control, 0, unacknowledged as u32);
            unacknowledged = 0;
            wake = true;
        }
        if wake {
            wake_writer.notify_one();
        }
        if state.borrow().broken.is_some() {
            return;
        }
        // Keep the unparsed tail at the front and read more behind it.
        buf.drain(..start);
        start = 0;
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(64 * 1024);
        }
        match read.read_buf(&mut buf).await {
            Ok(0) => break "the server closed the connection".to_string(),
            Ok(_) => {}
            Err(error) => break format!("read: {error}"),
        }
    };
    break_connection(&mut state.borrow_mut(), &finished, failure);
    wake_writer.notify_one();
}

/// Finishes the call on `stream`: answered if it got exactly the expected
/// bytes and no `failure`.
fn end_stream(
    state: &mut State,
    stream: u32,
    request: &Request,
    finished: &RefCell<Vec<Finished>>,
    failure: Option<String>,
) {
    let Some(at) = state.open.iter().position(|o| o.stream == stream) else {
        return;
    };
    let open = state.open.remove(at).expect("the position is in range");
    let result = match failure {
        Some(failure) => Err(failure),
        None if open.received == request.response_len => Ok(()),
        None => Err(format!(
            "an answer of {} bytes instead of {} (a gRPC error carries none)",
            open.received, request.response_len
        )),
    };
    finished.borrow_mut().push(Finished {
        due: open.due,
        sent: open.sent,
        done: Instant::now(),
        result,
    });
}

/// Fails every call in flight or queued on a broken connection.
fn break_connection(state: &mut State, finished: &RefCell<Vec<Finished>>, failure: String) {
    let now = Instant::now();
    let mut finished = finished.borrow_mut();
    for open in state.open.drain(..) {
        finished.push(Finished {
            due: open.due,
            sent: open.sent,
            done: now,
            result: Err(failure.clone()),
        });
    }
    for due in state.queue.drain(..) {
        finished.push(Finished {
            due,
            sent: now,
            done: now,
            result: Err(failure.clone()),
        });
    }
    state.broken.get_or_insert(failure);
}
