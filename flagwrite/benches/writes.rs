//! Write throughput of the real flagwrite binary: durable, acknowledged
//! writes from one client in series and from 64 concurrent clients, and the
//! server CPU one more subscriber costs per change.
//!
//! Run: `cargo bench -p flagwrite --bench writes` (optionally
//! `-- <serial writes> <concurrent writes> <subscribers>`). The data
//! directory lives under `target/`, on the same disk as a real deployment
//! would use, so every acknowledgement waits for a real fsync.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flagstream::pb;
use flagstream::pb::flag_admin_client::FlagAdminClient;
use flagstream::pb::replication_client::ReplicationClient;
use tonic::transport::Channel;

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // program too, without it, and then a tiny smoke run is enough.
    let benching = std::env::args().any(|a| a == "--bench");
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let serial = args
        .first()
        .copied()
        .unwrap_or(if benching { 3_000 } else { 20 });
    let concurrent = args
        .get(1)
        .copied()
        .unwrap_or(if benching { 30_000 } else { 128 });
    let subscribers = args
        .get(2)
        .copied()
        .unwrap_or(if benching { 16 } else { 2 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench(serial, concurrent, subscribers));
}

/// The flagwrite child process and its data directory.
struct Server {
    child: Child,
    addr: String,
    dir: std::path::PathBuf,
    metrics_port: u16,
}

impl Server {
    // The child is killed and waited for in `Drop`.
    #[allow(clippy::zombie_processes)]
    fn start() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("flagwrite-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let addr = format!("127.0.0.1:{port}");
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_flagwrite"))
            .args([
                "--listen",
                &addr,
                "--metrics-listen",
                &format!("127.0.0.1:{metrics_port}"),
                "--dev-no-auth",
            ])
            .arg("--data-dir")
            .arg(&dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return Server {
                    child,
                    addr,
                    dir,
                    metrics_port,
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("flagwrite did not start");
    }

    /// The server's flush count, from its metrics endpoint.
    fn flushes(&self) -> u64 {
        use std::io::{Read, Write};
        let mut socket = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        socket.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut body = String::new();
        socket.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix("flagwrite_flushes_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// User plus system CPU time the server process used so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // Linux reports clock ticks; USER_HZ is 100 on every mainstream kernel.
        Duration::from_millis(ticks * 10)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn toggle(i: u64, key: &str) -> pb::SetFlagEnabledRequest {
    pb::SetFlagEnabledRequest {
        namespace: "bench".into(),
        key: key.into(),
        enabled: i.is_multiple_of(2),
        ..Default::default()
    }
}

async fn writes(channel: &Channel, clients: u64, total: u64) -> Duration {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut admin = FlagAdminClient::new(channel.clone());
        let key = format!("flag-{}", c % 64);
        tasks.push(tokio::spawn(async move {
            for i in 0..total / clients {
                admin.set_flag_enabled(toggle(i, &key)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

async fn bench(serial: u64, concurrent: u64, subscribers: u64) {
    let server = Server::start();
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = FlagAdminClient::new(channel.clone());
    admin
        .create_namespace(pb::CreateNamespaceRequest {
            namespace: Some(pb::Namespace {
                key: "bench".into(),
                ..Default::default()
            }),
            options: None,
        })
        .await
        .unwrap();
    let on = |b| {
        Some(pb::TypedValue {
            kind: Some(pb::typed_value::Kind::BoolValue(b)),
        })
    };
    for i in 0..64 {
        let flag = pb::Flag {
            namespace: "bench".into(),
            key: format!("flag-{i}"),
            r#type: pb::FlagType::Boolean as i32,
            variants: vec![
                pb::Variant {
                    name: "on".into(),
                    value: on(true),
                    description: String::new(),
                },
                pb::Variant {
                    name: "off".into(),
                    value: on(false),
                    description: String::new(),
                },
            ],
            enabled: true,
            disabled_variant: "off".into(),
            default_variant: "on".into(),
            ..Default::default()
        };
        admin
            .create_flag(pb::CreateFlagRequest {
                flag: Some(flag),
                options: None,
            })
            .await
            .unwrap();
    }

    let flushes = server.flushes();
    let elapsed = writes(&channel, 1, serial).await;
    let serial_flushes = server.flushes() - flushes;
    println!(
        "serial, 1 client:        {serial} writes in {elapsed:.2?} = {:.0} durable writes/s ({serial_flushes} flushes)",
        serial as f64 / elapsed.as_secs_f64()
    );

    // 64 clients, each on its own HTTP/2 connection like separate admin tools.
    let flushes = server.flushes();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..64u64 {
        let addr = server.addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut admin = FlagAdminClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            let key = format!("flag-{c}");
            for i in 0..concurrent / 64 {
                admin.set_flag_enabled(toggle(i, &key)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let done = concurrent / 64 * 64;
    println!(
        "concurrent, 64 clients:  {done} writes in {elapsed:.2?} = {:.0} durable writes/s ({:.1} writes per flush)",
        done as f64 / elapsed.as_secs_f64(),
        done as f64 / (server.flushes() - flushes) as f64
    );

    // Server CPU per change without subscribers, then with `subscribers`
    // live subscribers that read every change.
    let per_change = if serial < 1_000 { 80 } else { 2_000u64 };
    let cpu0 = server.cpu();
    writes(&channel, 8, per_change).await;
    let base = server.cpu() - cpu0;
    let mut readers = Vec::new();
    let (done_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    for _ in 0..subscribers {
        let mut sync = ReplicationClient::new(channel.clone());
        // Resume at the head, in its history, as a caught-up replica does.
        let digest = admin
            .get_state_digest(pb::GetStateDigestRequest::default())
            .await
            .unwrap()
            .into_inner();
        let head = digest.revision;
        let head_chain: Vec<u8> = (0..digest.chain.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digest.chain[i..i + 2], 16).unwrap())
            .collect();
        let mut stream = sync
            .subscribe(pb::SubscribeRequest {
                from_revision: head,
                namespaces: vec![],
                chain: head_chain.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut done = done_tx.subscribe();
        readers.push(tokio::spawn(async move {
            let mut received = 0u64;
            loop {
                tokio::select! {
                    m = stream.message() => match m { Ok(Some(_)) => received += 1, _ => return received },
                    _ = done.recv() => return received,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu1 = server.cpu();
    writes(&channel, 8, per_change).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with = server.cpu() - cpu1;
    let _ = done_tx.send(());
    let mut received = 0;
    for reader in readers {
        received += reader.await.unwrap();
    }
    let extra = with.saturating_sub(base);
    println!(
        "subscribers: server CPU {:.2?} for {per_change} changes without, {:.2?} with {subscribers} subscribers ({received} messages) => {:.1} µs CPU per change per subscriber",
        base,
        with,
        extra.as_secs_f64() * 1e6 / (per_change * subscribers) as f64
    );
}
