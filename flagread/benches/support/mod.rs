//! Shared plumbing of the system benchmarks: child processes that die with the
//! benchmark, a watchdog that bounds its run time, tokens, gRPC clients with a
//! bearer token, flag fixtures, and the small statistics the reports print.
//!
//! Every benchmark in this folder runs the real `flagwrite` and `flagread`
//! binaries on 127.0.0.1 and nothing else: no traffic leaves the loopback.
#![allow(dead_code)]

pub mod fixtures;
pub mod proc;
pub mod stats;

use std::time::{Duration, Instant};

use flagstream::pb;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The secret of the admin token every benchmark writes into its tokens file.
pub const ADMIN_SECRET: &str = "bench-admin-secret-0123456789";
/// The secret of the sync token the replicas use to follow the writer.
pub const SYNC_SECRET: &str = "bench-sync-secret-0123456789";
/// The secret of the eval token the load generators send.
pub const EVAL_SECRET: &str = "bench-eval-secret-0123456789";

/// The tokens file shared by flagwrite and flagread (format of `flagstream::kit::auth`).
pub fn tokens_file_text() -> String {
    format!(
        "# Written by the flagstream benchmarks.\n\
         bench-admin admin {ADMIN_SECRET}\n\
         bench-sync sync {SYNC_SECRET}\n\
         bench-eval eval {EVAL_SECRET}\n"
    )
}

/// Adds `authorization: Bearer <secret>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(secret: &str) -> Bearer {
        Bearer(
            format!("Bearer {secret}")
                .parse()
                .expect("a token is valid ASCII metadata"),
        )
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type AdminClient = pb::flag_admin_client::FlagAdminClient<InterceptedService<Channel, Bearer>>;
pub type EvalClient = pb::flag_eval_client::FlagEvalClient<InterceptedService<Channel, Bearer>>;

/// Connects to `addr` (host:port), retrying until `within` has passed, because
/// a freshly spawned server needs a moment before it listens.
pub async fn connect(addr: &str, within: Duration) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a loopback address is a valid URI")
        .tcp_nodelay(true);
    let start = Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(channel) => return channel,
            Err(error) if start.elapsed() < within => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(error) => panic!("could not connect to {addr} within {within:?}: {error}"),
        }
    }
}

pub fn admin_client(channel: Channel) -> AdminClient {
    pb::flag_admin_client::FlagAdminClient::with_interceptor(channel, Bearer::new(ADMIN_SECRET))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

pub fn eval_client(channel: Channel) -> EvalClient {
    pb::flag_eval_client::FlagEvalClient::with_interceptor(channel, Bearer::new(EVAL_SECRET))
        .max_decoding_message_size(64 << 20)
}

/// Polls the standard health service until it reports SERVING for the whole
/// server (service ""), returning when it did; panics after `within`.
pub async fn wait_serving(addr: &str, within: Duration, poll: Duration) -> Instant {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let start = Instant::now();
    let channel = connect(addr, within).await;
    let mut health = HealthClient::new(channel);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|response| response.into_inner().status);
        if matches!(status, Ok(serving) if serving == ServingStatus::Serving as i32) {
            return Instant::now();
        }
        assert!(
            start.elapsed() < within,
            "{addr} was not SERVING within {within:?} (last answer: {status:?})"
        );
        tokio::time::sleep(poll).await;
    }
}

/// Reads `VmRSS` (resident memory now) and `VmHWM` (its peak) of a process, in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process is alive");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Reads an environment variable as a number, with a default.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a valid number")),
        Err(_) => default,
    }
}

/// `nproc` and the CPU model, printed at the head of every report because the
/// numbers mean nothing without them.
pub fn machine_line() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix("model name")
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    format!("{cpus} CPUs ({model})")
}

pub mod grpc_raw;
pub mod h2load;
pub mod h2raw;
pub mod paced;

use std::path::Path;
use std::process::Command;

/// A running flagwrite and the address it serves on.
pub struct Writer {
    pub proc: proc::Proc,
    pub addr: String,
}

/// A running flagread and the address it serves on.
pub struct Replica {
    pub proc: proc::Proc,
    pub addr: String,
    /// Where its OFREP server listens (`127.0.0.1:port`).
    pub ofrep_addr: String,
}

/// Writes the shared tokens file into the run directory.
pub fn write_tokens(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tokens");
    std::fs::write(&path, tokens_file_text()).expect("the run directory is writable");
    path
}

/// Starts flagwrite on a free loopback port with a fresh data directory and
/// waits until it is SERVING.
pub async fn start_writer(dir: &Path, tokens: &Path) -> Writer {
    start_writer_bin(dir, tokens, &proc::binary("flagwrite")).await
}

/// [`start_writer`] with another flagwrite build (a baseline to compare with).
pub async fn start_writer_bin(dir: &Path, tokens: &Path, binary: &Path) -> Writer {
    let addr = format!("127.0.0.1:{}", proc::free_port());
    // `FLAGSTREAM_BENCH_WRITER_NICE=19` (say) runs the writer at a lower CPU priority, to tell
    // apart on one machine what the writer's work costs the replicas from what their own does.
    let mut command = match std::env::var("FLAGSTREAM_BENCH_WRITER_NICE") {
        Ok(nice) if !nice.is_empty() => {
            let mut command = Command::new("nice");
            command.arg("-n").arg(nice).arg(binary);
            command
        }
        _ => Command::new(binary),
    };
    command
        .arg("--listen")
        .arg(&addr)
        .arg("--data-dir")
        .arg(dir.join("flagwrite-data"))
        .arg("--tokens-file")
        .arg(tokens)
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{}", proc::free_port()))
        .env("RUST_LOG", "warn");
    let mut proc = proc::Proc::spawn("flagwrite", command, dir);
    wait_serving(&addr, Duration::from_secs(20), Duration::from_millis(5)).await;
    proc.assert_alive();
    Writer { proc, addr }
}

/// Spawns flagread `name` following `writer` (without waiting for it).
pub fn spawn_replica(dir: &Path, tokens: &Path, writer: &str, name: &str) -> Replica {
    spawn_replica_on(dir, tokens, writer, name, None)
}

/// [`spawn_replica`], confined to one CPU if `cpu` is given (from its first
/// instruction, so its runtime starts one worker thread, as on a one-CPU pod).
pub fn spawn_replica_on(
    dir: &Path,
    tokens: &Path,
    writer: &str,
    name: &str,
    cpu: Option<usize>,
) -> Replica {
    spawn_replica_with(dir, tokens, writer, name, cpu, |_| {})
}

/// [`spawn_replica_on`], with `configure` adding arguments or environment
/// (a flag of the replica under test, fewer runtime threads) before it starts.
pub fn spawn_replica_with(
    dir: &Path,
    tokens: &Path,
    writer: &str,
    name: &str,
    cpu: Option<usize>,
    configure: impl FnOnce(&mut Command),
) -> Replica {
    let addr = format!("127.0.0.1:{}", proc::free_port());
    let ofrep_addr = format!("127.0.0.1:{}", proc::free_port());
    // `FLAGSTREAM_BENCH_WRAP="perf record -g -o /tmp/flagread.perf --"` (say)
    // runs every replica under a profiler.
    let wrap = std::env::var("FLAGSTREAM_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut command = proc::command_on(cpu, program);
            command.args(words).arg(proc::binary("flagread"));
            command
        }
        None => proc::command_on(cpu, proc::binary("flagread")),
    };
    command
        .arg("--listen")
        .arg(&addr)
        .arg("--upstream")
        .arg(format!("http://{writer}"))
        .arg("--sync-token")
        .arg(SYNC_SECRET)
        .arg("--tokens-file")
        .arg(tokens)
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{}", proc::free_port()))
        .arg("--ofrep-listen")
        .arg(&ofrep_addr)
        // The OpenFeature front ends read the fixtures' namespace without a selector.
        .arg("--flagd-default-namespace")
        .arg(fixtures::NAMESPACE)
        .env("RUST_LOG", "warn");
    configure(&mut command);
    let mut proc = proc::Proc::spawn(name, command, dir);
    proc.graceful = !wrap.is_empty();
    Replica {
        proc,
        addr,
        ofrep_addr,
    }
}

/// CPU time (user + system, seconds) used so far by every process on the
/// machine except this one and the children it started: the difference over
/// a run is what the neighbours, kernel threads included, took meanwhile
/// (roughly: a process that exits takes its time with it).
pub fn others_cpu_seconds() -> f64 {
    let ours = proc::children();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && !ours.contains(pid))
        .filter_map(try_cpu_seconds)
        .sum()
}

/// CPU time (user + system) a process has used so far, in seconds, from
/// `/proc/<pid>/stat`. Unlike requests per second on a shared machine, CPU
/// per request does not depend on what else runs at the same time.
pub fn cpu_seconds(pid: u32) -> f64 {
    try_cpu_seconds(pid).expect("the process is alive")
}

/// [`cpu_seconds`], or `None` if the process is gone.
fn try_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; count fields after its ')'.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Whether `cargo bench` started this program (it passes `--bench`). Under
/// `cargo test --all-targets` it is started without, and then the benchmark
/// only says how to run it instead of taking minutes and the machine.
pub fn started_by_cargo_bench(name: &str) -> bool {
    if std::env::args().any(|arg| arg == "--bench") {
        return true;
    }
    println!(
        "{name}: a system benchmark; run it with `cargo bench -p flagread --bench {name}` or scripts/bench-*.sh"
    );
    false
}

/// A Replication client of the writer at `addr` (host:port), presenting the sync token, that
/// takes snapshot chunks of any size the writer sends.
pub async fn sync_client(
    addr: &str,
) -> pb::replication_client::ReplicationClient<InterceptedService<Channel, Bearer>> {
    pb::replication_client::ReplicationClient::with_interceptor(
        connect(addr, Duration::from_secs(5)).await,
        Bearer::new(SYNC_SECRET),
    )
    .max_decoding_message_size(64 << 20)
}
