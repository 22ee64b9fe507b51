//! A TCP proxy of the test's own on 127.0.0.1 that puts network faults between replicas and the
//! writer: cut connections, a stalled path, added latency, a half-open path and flapping.
//!
//! A connection is two pumps (one per direction), each a reader and a writer task joined by a
//! bounded channel, so added latency delays every chunk without limiting throughput. A path
//! that stalls or goes half-open stays dead for the connections that were on it, as a real
//! black hole does (a crashed middlebox, a listener that accepts and never answers): only new
//! connections made after healing work again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The fault the proxy applies now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Everything passes.
    None,
    /// Every open connection is closed, and new ones are closed as soon as they are accepted.
    Cut,
    /// Connections are accepted, nothing is forwarded either way, nothing is closed.
    Stall,
    /// Every chunk is delivered this much later.
    Delay(Duration),
    /// The writer's bytes no longer reach the replica; the replica's still reach the writer;
    /// nothing is closed.
    HalfOpen,
}

/// A running proxy; stops (closing every connection) when dropped.
pub struct Proxy {
    /// Its address, as `http://127.0.0.1:port`, for a replica's `--upstream`.
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// What the accept loop and every connection share.
struct Shared {
    fault: Mutex<Fault>,
    /// Bumped by a cut: every connection ends when it changes.
    cuts: watch::Sender<u64>,
    /// The black-hole flags of the live connections, to kill them on stall or half-open.
    conns: Mutex<Vec<Arc<Holes>>>,
}

/// Which directions of one connection are dead for good.
#[derive(Default)]
struct Holes {
    /// Writer → replica.
    down: AtomicBool,
    /// Replica → writer.
    up: AtomicBool,
}

impl Proxy {
    /// Starts a proxy in front of `upstream` (`127.0.0.1:port`).
    pub async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::None),
            cuts: watch::channel(0).0,
            conns: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(accept(listener, upstream, shared.clone()));
        Proxy { url, shared, task }
    }

    /// Applies `fault` from now on (`Fault::None` heals).
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
        let conns = self.shared.conns.lock().unwrap();
        match fault {
            Fault::Cut => {
                self.shared.cuts.send_modify(|n| *n += 1);
            }
            Fault::Stall => {
                for holes in conns.iter() {
                    holes.down.store(true, Ordering::Relaxed);
                    holes.up.store(true, Ordering::Relaxed);
                }
            }
            Fault::HalfOpen => {
                for holes in conns.iter() {
                    holes.down.store(true, Ordering::Relaxed);
                }
            }
            Fault::None | Fault::Delay(_) => {}
        }
    }

    fn fault(&self) -> Fault {
        *self.shared.fault.lock().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The accept task owns the connections' JoinSet: aborting it aborts them all.
        self.task.abort();
    }
}

/// Accepts connections until the proxy is dropped.
async fn accept(listener: TcpListener, upstream: std::net::SocketAddr, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let fault = *shared.fault.lock().unwrap();
        if fault == Fault::Cut {
            drop(client);
            continue;
        }
        let holes = Arc::new(Holes::default());
        match fault {
            Fault::Stall => {
                holes.down.store(true, Ordering::Relaxed);
                holes.up.store(true, Ordering::Relaxed);
            }
            Fault::HalfOpen => holes.down.store(true, Ordering::Relaxed),
            _ => {}
        }
        {
            let mut conns = shared.conns.lock().unwrap();
            conns.retain(|h| Arc::strong_count(h) > 1);
            conns.push(holes.clone());
        }
        connections.spawn(connection(client, upstream, shared.clone(), holes));
    }
}

/// Forwards one connection until either side closes or a cut.
async fn connection(
    client: TcpStream,
    upstream: std::net::SocketAddr,
    shared: Arc<Shared>,
    holes: Arc<Holes>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut cuts = shared.cuts.subscribe();
    cuts.mark_unchanged();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(
        client_read,
        server_write,
        shared.clone(),
        holes.clone(),
        true,
    );
    let down = pump(
        server_read,
        client_write,
        shared.clone(),
        holes.clone(),
        false,
    );
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = cuts.changed() => {}
    }
}

/// One direction of a connection: reads chunks, drops them if this direction is dead, and
/// writes each after the delay in force when it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    holes: Arc<Holes>,
    upward: bool,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let dead = if upward {
                holes.up.load(Ordering::Relaxed)
            } else {
                holes.down.load(Ordering::Relaxed)
            };
            if dead {
                continue;
            }
            let delay = match *shared.fault.lock().unwrap() {
                Fault::Delay(d) => d,
                _ => Duration::ZERO,
            };
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
        // Dropping `tx` lets the writer finish what is queued and then close its side.
    };
    let writer = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Flaps the path: `times` times cut for `down`, then whole for `up`; ends healed.
pub async fn flap(proxy: &Proxy, times: u32, down: Duration, up: Duration) {
    for _ in 0..times {
        proxy.set(Fault::Cut);
        tokio::time::sleep(down).await;
        proxy.set(Fault::None);
        tokio::time::sleep(up).await;
    }
    debug_assert_eq!(proxy.fault(), Fault::None);
}
