//! Capacity: what one flagwrite pays per replica that follows it, how long a
//! write takes to reach 16–128 replicas (directly, or through a 2-level chain
//! of replicas serving replication), and what many simultaneous cold starts
//! cost the writer.
//!
//! Three parts, each runnable alone:
//! - `subscribers`: one flagwrite holding one namespace of 350 mixed flags,
//!   followed by 0, then 1, 4, 16, 64, 128 replicas (added to the ones already
//!   running). At each count, once every replica is SERVING: the writer's CPU
//!   (utime + stime from `/proc/<pid>/stat`) over 10 s without writes and its
//!   `VmRSS`; then the writer's CPU over 500 writes made one at a time, each
//!   acknowledged before the next (alternately a kill switch and an
//!   `UpdateFlag` of the constrained flag's rollout, as in propagation.rs),
//!   net of the at-rest rate over the same window, plus 1 s for the last
//!   change to leave. `/proc/<pid>/stat` counts in clock ticks (10 ms), too
//!   coarse for an idle writer, so the at-rest CPU is the sum over the
//!   writer's threads of `/proc/<pid>/task/<tid>/schedstat` (nanoseconds;
//!   a thread that exits during the window takes its share with it); the
//!   per-change CPU uses `/proc/<pid>/stat`, which keeps exited threads'
//!   time. Bytes per change per subscriber come two ways: the protobuf size
//!   of the `SyncMessage` Change each kind of write produces (read by the
//!   benchmark's own Subscribe, before any replica starts), and the growth of
//!   `bytes_sent` (`ss -ti`, TCP payload, so HTTP/2 and gRPC framing
//!   included) of the writer's server sockets over the writes, minus that at
//!   0 subscribers, per write and subscriber. A least-squares line through
//!   CPU per change against the subscriber count gives the cost of one more
//!   subscriber.
//! - `propagation`: write acknowledged → applied on every measured replica,
//!   seen on each one's `Watch` stream (as propagation.rs), 200 writes a few
//!   ms apart, with 16, 64, 128 replicas following the writer directly, then
//!   128 leaves following 8 mid replicas that follow the writer (flagread
//!   `--serve-replication`); the chain is measured at the leaves only. A
//!   flagread without `--serve-replication` skips the chain with a message.
//! - `storm`: a writer holding 10,000, then 100,000 flags (ImportNamespace of
//!   5,000-flag namespaces, as scale.rs); 16, then 64 fresh replicas started
//!   at once. Reported: first spawn → all SERVING, the median replica's own
//!   spawn → SERVING (SERVING is pushed by the standard health `Watch`, so
//!   no polling load), the writer's peak RSS (`VmHWM` after writing 5 to its
//!   `clear_refs` before the storm; and the largest `VmRSS` sampled every
//!   10 ms), its CPU seconds during the storm and its RSS before. A
//!   configuration is skipped when its replicas (about 240 MB per 100,000
//!   flags each) would need more than `MemAvailable` minus 2 GB.
//!
//! Every replica runs with `TOKIO_WORKER_THREADS=1` (flagread's `#[tokio::main]`
//! runtime honours it), so that 128 of them fit on a small machine.
//!
//! Run it with `scripts/bench-capacity.sh`, or `cargo bench -p flagread
//! --bench capacity` once flagwrite is built. Knobs (environment):
//! `BENCH_PARTS` (comma list of `subscribers`, `propagation`, `storm`; default
//! all), `BENCH_SUBSCRIBERS` (default `1,4,16,64,128`), `BENCH_REST_S`
//! (default 10), `BENCH_CHANGES` (default 500), `BENCH_FANOUT` (default
//! `16,64,128`), `BENCH_CHAIN` (mids x leaves per mid, default `8x16`; empty
//! for none), `BENCH_WRITES` (per propagation configuration, default 200),
//! `BENCH_STORM_FLAGS` (default `10000,100000`), `BENCH_STORM_N` (default
//! `16,64`), `BENCH_STORM_TIMEOUT_S` (default 600), `BENCH_REPLICA_WORKERS`
//! (default 1; empty for the runtime's default). To compare with another
//! writer build, set `BENCH_FLAGWRITE=/path/to/flagwrite` (the tables name
//! the binary used).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flagstream::pb;
use prost::Message;
use support::fixtures::{self, NAMESPACE};
use support::proc::{self, RunDir};
use support::stats::percentile;
use tokio::sync::mpsc;

/// Flags in the namespace of the subscriber and propagation parts.
const MIXED_FLAGS: usize = 350;
/// Resident memory of one replica per flag it holds (scale.rs: about 240 MB
/// for 100,000), for the storm's memory guard.
const REPLICA_BYTES_PER_FLAG: u64 = 240 * 1_000_000 / 100_000;
/// Memory the storm leaves to everything else on the machine.
const MEMORY_RESERVE: u64 = 2 << 30;

/// One Watch event as received: which replica, the revision it reported, when.
type Seen = (usize, u64, Instant);

fn main() {
    if !support::started_by_cargo_bench("capacity") {
        return;
    }
    proc::watchdog(Duration::from_secs(40 * 60));
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    runtime.block_on(run());
}

/// What every part shares.
struct Bench {
    dir: RunDir,
    tokens: PathBuf,
    /// The flagwrite binary under test (`BENCH_FLAGWRITE` or this build's).
    flagwrite: PathBuf,
    /// `TOKIO_WORKER_THREADS` of every replica; empty leaves the default.
    workers: String,
}

async fn run() {
    let parts = std::env::var("BENCH_PARTS")
        .unwrap_or_else(|_| "subscribers,propagation,storm".to_string());
    let parts: Vec<&str> = parts.split(',').map(str::trim).collect();
    for part in &parts {
        assert!(
            ["subscribers", "propagation", "storm"].contains(part),
            "BENCH_PARTS: unknown part {part:?} (known: subscribers, propagation, storm)"
        );
    }
    let flagwrite = match std::env::var("BENCH_FLAGWRITE") {
        Ok(path) if !path.is_empty() => PathBuf::from(path),
        _ => proc::binary("flagwrite"),
    };
    assert!(
        flagwrite.exists(),
        "BENCH_FLAGWRITE: {} does not exist",
        flagwrite.display()
    );
    let dir = RunDir::new("capacity");
    let tokens = support::write_tokens(dir.path());
    let bench = Bench {
        dir,
        tokens,
        flagwrite,
        workers: std::env::var("BENCH_REPLICA_WORKERS").unwrap_or_else(|_| "1".to_string()),
    };
    println!("machine: {}", support::machine_line());
    println!(
        "flagwrite: {}; flagread: {}; replicas with TOKIO_WORKER_THREADS={}",
        bench.flagwrite.display(),
        proc::binary("flagread").display(),
        if bench.workers.is_empty() {
            "(default)"
        } else {
            &bench.workers
        }
    );
    for part in ["subscribers", "propagation", "storm"] {
        if !parts.contains(&part) {
            continue;
        }
        let started = Instant::now();
        eprintln!("== {part}: starting");
        match part {
            "subscribers" => subscribers(&bench).await,
            "propagation" => propagation(&bench).await,
            _ => storm(&bench).await,
        }
        eprintln!(
            "== {part}: done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
}

/// Part 1: the writer's CPU and memory per subscriber, at rest and per change.
async fn subscribers(bench: &Bench) {
    let counts = list("BENCH_SUBSCRIBERS", "1,4,16,64,128");
    let rest = Duration::from_secs(support::env_or("BENCH_REST_S", 10));
    let changes: usize = support::env_or("BENCH_CHANGES", 500);
    let dir = subdir(bench, "subscribers");
    let writer = support::start_writer_bin(&dir, &bench.tokens, &bench.flagwrite).await;
    let pid = writer.proc.pid();
    let port: u16 = writer
        .addr
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .expect("the writer listens on host:port");
    let mut writes = fixtures::Writes::load(&writer.addr, MIXED_FLAGS).await.0;
    let (switch_size, update_size) = change_sizes(&writer.addr, &mut writes).await;
    eprintln!(
        "subscribers: encoded Change: {switch_size} B (kill switch), {update_size} B (rollout update)"
    );

    /// One row of the table.
    struct Row {
        n: usize,
        rss_kib: u64,
        threads: f64,
        rest_cpu_per_s: f64,
        change_cpu: f64,
        sent_per_change: Option<f64>,
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut replicas: Vec<support::Replica> = Vec::new();
    for n in std::iter::once(0).chain(counts) {
        let before = replicas.len();
        for index in before..n {
            replicas.push(spawn(
                bench,
                &dir,
                &writer.addr,
                &format!("flagread-{index}"),
                false,
            ));
        }
        let addrs: Vec<String> = replicas[before..].iter().map(|r| r.addr.clone()).collect();
        eprintln!(
            "subscribers: N={n}: waiting for {} new replicas",
            addrs.len()
        );
        let serving = wait_serving_all(addrs, Duration::from_secs(300)).await;
        assert_all_serving(&serving, &replicas[before..]);
        // Let the snapshots leave and the start-up settle.
        tokio::time::sleep(Duration::from_secs(2)).await;

        let threads_before = thread_cpu_ns(pid);
        let started = Instant::now();
        tokio::time::sleep(rest).await;
        let rest_cpu_per_s = thread_cpu_delta_ns(&threads_before, &thread_cpu_ns(pid)) as f64
            / 1e9
            / started.elapsed().as_secs_f64();
        let (rss_kib, _) = support::rss_kib(pid);

        let cpu = support::cpu_seconds(pid);
        let sent = bytes_sent(port);
        let started = Instant::now();
        for _ in 0..changes {
            writes.next().await;
        }
        // The last changes still have to leave for every subscriber.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let window = started.elapsed().as_secs_f64();
        let change_cpu =
            ((support::cpu_seconds(pid) - cpu) - rest_cpu_per_s * window) / changes as f64;
        let sent_per_change = bytes_sent(port)
            .zip(sent)
            .map(|(after, before)| after.saturating_sub(before) as f64 / changes as f64);
        let threads = mean(replicas.iter().map(|r| threads_of(r.proc.pid()) as f64));
        for replica in &mut replicas {
            replica.proc.assert_alive();
        }
        eprintln!(
            "subscribers: N={n}: rest {:.1} µs/s, {:.1} µs/change, RSS {:.1} MB",
            rest_cpu_per_s * 1e6,
            change_cpu * 1e6,
            mib(rss_kib)
        );
        rows.push(Row {
            n,
            rss_kib,
            threads,
            rest_cpu_per_s,
            change_cpu,
            sent_per_change,
        });
    }

    let zero = &rows[0];
    println!();
    println!(
        "writer cost per subscriber: one namespace of {MIXED_FLAGS} mixed flags, {} s at rest, {changes} acknowledged writes per count (flagwrite: {})",
        rest.as_secs(),
        bench.flagwrite.display()
    );
    println!();
    println!(
        "| subscribers | writer RSS | RSS − RSS at 0 | CPU at rest | CPU at rest per subscriber | CPU per change | CPU per change per subscriber | TCP bytes per change per subscriber | replica threads |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let per = |value: f64, at_zero: f64| {
            if row.n == 0 {
                "–".to_string()
            } else {
                format!("{:.2}", (value - at_zero) / row.n as f64)
            }
        };
        println!(
            "| {} | {:.1} MB | {:+.1} MB | {:.0} µs/s | {} µs/s | {:.1} µs | {} µs | {} B | {} |",
            row.n,
            mib(row.rss_kib),
            mib(row.rss_kib) - mib(zero.rss_kib),
            row.rest_cpu_per_s * 1e6,
            per(row.rest_cpu_per_s * 1e6, zero.rest_cpu_per_s * 1e6),
            row.change_cpu * 1e6,
            per(row.change_cpu * 1e6, zero.change_cpu * 1e6),
            match (row.sent_per_change, zero.sent_per_change) {
                (Some(sent), Some(at_zero)) => per(sent, at_zero),
                _ => "n/a".to_string(),
            },
            if row.n == 0 {
                "–".to_string()
            } else {
                format!("{:.1}", row.threads)
            },
        );
    }
    let points: Vec<(f64, f64)> = rows
        .iter()
        .filter(|row| row.n > 0)
        .map(|row| (row.n as f64, row.change_cpu * 1e6))
        .collect();
    let (slope, intercept) = least_squares(&points);
    println!();
    println!(
        "CPU per change vs subscribers (least squares over N ≥ 1): slope {slope:.2} µs per change per subscriber, intercept {intercept:.1} µs (measured at 0 subscribers: {:.1} µs)",
        zero.change_cpu * 1e6
    );
    println!(
        "bytes per change per subscriber: encoded SyncMessage Change {switch_size} B (kill switch) / {update_size} B (rollout update), mean {:.0} B, read by a raw Subscribe (protobuf only; + 5 B gRPC and 9 B HTTP/2 frame header when sent alone); the TCP column is the growth of bytes_sent (ss -ti) of the writer's server sockets over the writes, less that at 0 subscribers, per change and subscriber (flagwrite exports no bytes-sent metric)",
        (switch_size + update_size) as f64 / 2.0
    );
    println!(
        "CPU at rest: sum of the writer's threads' schedstat (ns); CPU per change: /proc/<pid>/stat utime+stime (10 ms ticks), net of the at-rest rate over its window ({changes} writes + 1 s); per-subscriber columns subtract the value at 0 subscribers and divide by N"
    );
    drop(replicas);
    drop(writer);
}

/// Part 2: write acknowledged → applied on every measured replica.
async fn propagation(bench: &Bench) {
    let fanouts = list("BENCH_FANOUT", "16,64,128");
    let chain = std::env::var("BENCH_CHAIN").unwrap_or_else(|_| "8x16".to_string());
    let count: usize = support::env_or("BENCH_WRITES", 200);
    let dir = subdir(bench, "propagation");
    let writer = support::start_writer_bin(&dir, &bench.tokens, &bench.flagwrite).await;
    let mut writes = fixtures::Writes::load(&writer.addr, MIXED_FLAGS).await.0;

    /// One measured configuration.
    struct Row {
        label: String,
        measured: usize,
        processes: usize,
        delays: Vec<f64>,
        first: Vec<f64>,
        acks: Vec<f64>,
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();

    // Direct: the replicas of one count stay for the next, larger one.
    let mut replicas: Vec<support::Replica> = Vec::new();
    let mut watched = Watched::new();
    for &n in &fanouts {
        let before = replicas.len();
        for index in before..n {
            replicas.push(spawn(
                bench,
                &dir,
                &writer.addr,
                &format!("direct-{index}"),
                false,
            ));
        }
        eprintln!(
            "propagation: {n} direct: waiting for {} new replicas",
            n - before
        );
        let addrs: Vec<String> = replicas[before..].iter().map(|r| r.addr.clone()).collect();
        let serving = wait_serving_all(addrs, Duration::from_secs(300)).await;
        assert_all_serving(&serving, &replicas[before..]);
        for replica in &replicas[before..] {
            watched.add(&replica.addr).await;
        }
        let (delays, first, acks) = measure(&mut writes, &mut watched, count).await;
        for replica in &mut replicas {
            replica.proc.assert_alive();
        }
        eprintln!(
            "propagation: {n} direct: p50 {:.2} ms",
            percentile(&mut delays.clone(), 50.0)
        );
        rows.push(Row {
            label: format!("{n} replicas following the writer"),
            measured: n,
            processes: n,
            delays,
            first,
            acks,
        });
    }
    drop(watched);
    drop(replicas);

    // Chain: mids follow the writer and serve replication; leaves follow the mids.
    if let Some((mids, per_mid)) = chain.split_once('x') {
        let mids: usize = mids.trim().parse().expect("BENCH_CHAIN is MIDSxLEAVES");
        let per_mid: usize = per_mid.trim().parse().expect("BENCH_CHAIN is MIDSxLEAVES");
        let help = Command::new(proc::binary("flagread"))
            .arg("--help")
            .output()
            .expect("flagread --help runs");
        if !String::from_utf8_lossy(&help.stdout).contains("--serve-replication") {
            let message = "chaining: flagread has no --serve-replication; skipped";
            eprintln!("{message}");
            println!("{message}");
            skipped.push(format!("{mids} mids x {per_mid} leaves: {message}"));
        } else {
            let mut middle: Vec<support::Replica> = (0..mids)
                .map(|index| spawn(bench, &dir, &writer.addr, &format!("mid-{index}"), true))
                .collect();
            eprintln!("propagation: chain: waiting for {mids} mids");
            let serving = wait_serving_all(
                middle.iter().map(|r| r.addr.clone()).collect(),
                Duration::from_secs(300),
            )
            .await;
            assert_all_serving(&serving, &middle);
            let mut leaves: Vec<support::Replica> = Vec::new();
            for (m, mid) in middle.iter().enumerate() {
                for index in 0..per_mid {
                    leaves.push(spawn(
                        bench,
                        &dir,
                        &mid.addr,
                        &format!("leaf-{m}-{index}"),
                        false,
                    ));
                }
            }
            eprintln!("propagation: chain: waiting for {} leaves", leaves.len());
            let serving = wait_serving_all(
                leaves.iter().map(|r| r.addr.clone()).collect(),
                Duration::from_secs(300),
            )
            .await;
            assert_all_serving(&serving, &leaves);
            let mut watched = Watched::new();
            for leaf in &leaves {
                watched.add(&leaf.addr).await;
            }
            let (delays, first, acks) = measure(&mut writes, &mut watched, count).await;
            for replica in middle.iter_mut().chain(leaves.iter_mut()) {
                replica.proc.assert_alive();
            }
            rows.push(Row {
                label: format!(
                    "{} leaves through {mids} mids ({per_mid} leaves each)",
                    leaves.len()
                ),
                measured: leaves.len(),
                processes: mids + leaves.len(),
                delays,
                first,
                acks,
            });
        }
    }

    println!();
    println!(
        "propagation: write acknowledged → applied on every measured replica (Watch streams), {count} writes per configuration a few ms apart (flagwrite: {})",
        bench.flagwrite.display()
    );
    println!();
    println!(
        "| configuration | measured replicas | flagread processes | p50 | p99 | max | ack → first replica, p50 | write ack, p50 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &mut rows {
        println!(
            "| {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            row.label,
            row.measured,
            row.processes,
            percentile(&mut row.delays, 50.0),
            percentile(&mut row.delays, 99.0),
            percentile(&mut row.delays, 100.0),
            percentile(&mut row.first, 50.0),
            percentile(&mut row.acks, 50.0),
        );
    }
    for line in &skipped {
        println!("| {line} | – | – | – | – | – | – | – |");
    }
    drop(writer);
}

/// Part 3: N simultaneous cold starts against a writer holding F flags.
async fn storm(bench: &Bench) {
    let mut flag_counts = list("BENCH_STORM_FLAGS", "10000,100000");
    let mut storm_sizes = list("BENCH_STORM_N", "16,64");
    flag_counts.sort_unstable();
    storm_sizes.sort_unstable();
    let timeout = Duration::from_secs(support::env_or("BENCH_STORM_TIMEOUT_S", 600));

    let mut lines: Vec<String> = Vec::new();
    for &total in &flag_counts {
        let dir = subdir(bench, &format!("storm-{total}"));
        let writer = support::start_writer_bin(&dir, &bench.tokens, &bench.flagwrite).await;
        let pid = writer.proc.pid();
        let mut admin =
            support::admin_client(support::connect(&writer.addr, Duration::from_secs(5)).await);
        let loading = Instant::now();
        let mut loaded = 0;
        let mut namespace_count = 0;
        while loaded < total {
            let count = 5_000.min(total - loaded);
            let namespace = format!("scale-{namespace_count:03}");
            fixtures::import(
                &mut admin,
                &namespace,
                fixtures::mixed_namespace(&namespace, count),
            )
            .await;
            loaded += count;
            namespace_count += 1;
        }
        eprintln!(
            "storm: loaded {total} flags in {:.1} s",
            loading.elapsed().as_secs_f64()
        );
        // Let the writer settle after the imports.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for &n in &storm_sizes {
            let need = n as u64 * REPLICA_BYTES_PER_FLAG * total as u64;
            let available = mem_available();
            if need > available.saturating_sub(MEMORY_RESERVE) {
                let reason = format!(
                    "skipped: {n} replicas need about {:.1} GB, MemAvailable {:.1} GB minus 2 GB",
                    need as f64 / 1e9,
                    available as f64 / 1e9
                );
                eprintln!("storm: {total} flags x {n}: {reason}");
                lines.push(format!(
                    "| {total} | {n} | {reason} | – | – | – | – | – | – |"
                ));
                continue;
            }
            eprintln!("storm: {total} flags x {n} replicas");
            let (rss_before, _) = support::rss_kib(pid);
            std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
                .expect("the writer's peak RSS can be reset");
            let sampler = RssSampler::start(pid);
            let cpu = support::cpu_seconds(pid);
            let first_spawn = Instant::now();
            let mut spawned = Vec::with_capacity(n);
            let mut replicas = Vec::with_capacity(n);
            for index in 0..n {
                spawned.push(Instant::now());
                replicas.push(spawn(
                    bench,
                    &dir,
                    &writer.addr,
                    &format!("storm-{total}-{n}-{index}"),
                    false,
                ));
            }
            let serving =
                wait_serving_all(replicas.iter().map(|r| r.addr.clone()).collect(), timeout).await;
            let cpu = support::cpu_seconds(pid) - cpu;
            let (_, hwm) = support::rss_kib(pid);
            let sampled = sampler.stop();
            let reached = serving.iter().filter(|t| t.is_some()).count();
            let mut own: Vec<f64> = serving
                .iter()
                .zip(&spawned)
                .filter_map(|(t, s)| t.map(|t| t.duration_since(*s).as_secs_f64()))
                .collect();
            let all = serving
                .iter()
                .flatten()
                .max()
                .map(|t| t.duration_since(first_spawn).as_secs_f64());
            let all = match (all, reached == n) {
                (Some(all), true) => format!("{all:.2} s"),
                // A health stream also ends early when its replica exits (say, its writer was
                // killed), so say whether the writer is still there.
                (_, _) => format!(
                    "{reached} of {n} SERVING (timeout {timeout:?}); writer {}",
                    if std::path::Path::new(&format!("/proc/{pid}/exe")).exists() {
                        "alive"
                    } else {
                        "gone (see dmesg for the OOM killer)"
                    }
                ),
            };
            eprintln!("storm: {total} flags x {n}: all SERVING after {all}");
            lines.push(format!(
                "| {total} | {n} | {all} | {:.2} s | {:.1} MB | {:.1} MB | {:.1} MB | {cpu:.2} s | {:.0} MB |",
                percentile(&mut own, 50.0),
                mib(rss_before),
                mib(hwm),
                mib(sampled),
                mem_available() as f64 / 1e6,
            ));
            drop(replicas);
            // Give the writer a moment to drop the finished streams.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        drop(writer);
    }
    println!();
    println!(
        "storm: N fresh replicas started at once against one writer (flagwrite: {})",
        bench.flagwrite.display()
    );
    println!();
    println!(
        "| flags | replicas | first spawn → all SERVING | spawn → SERVING, p50 | writer RSS before | writer peak RSS (VmHWM) | writer max sampled VmRSS (10 ms) | writer CPU during storm | MemAvailable at the end |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for line in &lines {
        println!("{line}");
    }
}

/// The Watch streams of the measured replicas, merged into one channel.
struct Watched {
    sender: mpsc::UnboundedSender<Seen>,
    seen: mpsc::UnboundedReceiver<Seen>,
    /// The last revision each replica reported.
    applied: Vec<u64>,
}

impl Watched {
    fn new() -> Watched {
        let (sender, seen) = mpsc::unbounded_channel();
        Watched {
            sender,
            seen,
            applied: Vec::new(),
        }
    }

    /// Opens a Watch stream on the replica at `addr`.
    async fn add(&mut self, addr: &str) {
        let index = self.applied.len();
        self.applied.push(0);
        let mut client = support::eval_client(support::connect(addr, Duration::from_secs(5)).await);
        let mut stream = client
            .watch(pb::WatchRequest {
                namespace: NAMESPACE.to_string(),
                context: None,
                flag_keys: Vec::new(),
            })
            .await
            .unwrap_or_else(|status| panic!("Watch on {addr} failed: {status}"))
            .into_inner();
        let sender = self.sender.clone();
        // Ends when the replica closes the stream or the Watched is dropped.
        tokio::spawn(async move {
            while let Ok(Some(event)) = stream.message().await {
                if sender
                    .send((index, event.revision, Instant::now()))
                    .is_err()
                {
                    break;
                }
            }
        });
    }
}

/// Makes `count` writes a few ms apart and returns, in ms, ack → applied on
/// all, ack → applied on the first, and send → ack of each.
async fn measure(
    writes: &mut fixtures::Writes,
    watched: &mut Watched,
    count: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    // Every replica must hold the latest revision before timing starts.
    let head = writes.next().await;
    wait_all(watched, head, Instant::now()).await;
    let mut delays = Vec::with_capacity(count);
    let mut first = Vec::with_capacity(count);
    let mut acks = Vec::with_capacity(count);
    for _ in 0..count {
        let sent = Instant::now();
        let revision = writes.next().await;
        let acked = Instant::now();
        let times = wait_all(watched, revision, acked).await;
        let last = times.iter().max().copied().expect("at least one replica");
        let earliest = times.iter().min().copied().expect("at least one replica");
        delays.push(ms(last.saturating_duration_since(acked)));
        first.push(ms(earliest.saturating_duration_since(acked)));
        acks.push(ms(acked.duration_since(sent)));
        // Let the system settle so each write is measured on its own.
        tokio::time::sleep(Duration::from_millis(2 + fastrand::u64(0..4))).await;
    }
    (delays, first, acks)
}

/// Reads Watch events until every replica has reported `revision` or later,
/// returning for each the instant it did (as propagation.rs). Panics after
/// 30 s naming the laggards.
async fn wait_all(watched: &mut Watched, revision: u64, since: Instant) -> Vec<Instant> {
    let mut times: Vec<Option<Instant>> = watched
        .applied
        .iter()
        .map(|&have| (have >= revision).then_some(since))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while times.iter().any(Option::is_none) {
        let event = tokio::time::timeout_at(deadline, watched.seen.recv()).await;
        let Ok(Some((index, reported, at))) = event else {
            let behind: Vec<String> = watched
                .applied
                .iter()
                .enumerate()
                .filter(|(_, have)| **have < revision)
                .map(|(index, have)| format!("#{index} at {have}"))
                .collect();
            panic!(
                "revision {revision} did not reach every replica within 30 s: {}",
                behind.join(", ")
            );
        };
        watched.applied[index] = watched.applied[index].max(reported);
        if reported >= revision && times[index].is_none() {
            times[index] = Some(at);
        }
    }
    times
        .into_iter()
        .map(|time| time.expect("every replica reported"))
        .collect()
}

/// Subscribes like a replica, then makes one write of each kind and returns
/// the protobuf size of the two `SyncMessage` Change messages they produced.
async fn change_sizes(writer: &str, writes: &mut fixtures::Writes) -> (usize, usize) {
    let mut client = support::sync_client(writer).await;
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            from_revision: 0,
            namespaces: Vec::new(),
            chain: Vec::new(),
        })
        .await
        .unwrap_or_else(|status| panic!("Subscribe failed: {status}"))
        .into_inner();
    // Read the whole snapshot first (a subscriber that left its snapshot
    // unread once saw the next write's acknowledgement stall, with a writer
    // built before shared snapshots; not reproduced since).
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the snapshot arrives within 30 s")
            .unwrap_or_else(|status| panic!("the change stream failed: {status}"))
            .expect("the change stream stays open");
        if matches!(message.kind, Some(pb::sync_message::Kind::SnapshotEnd(_))) {
            break;
        }
    }
    assert_eq!(writes.count % 2, 0, "the next write is the kill switch");
    writes.next().await;
    let switch = next_change(&mut stream).await;
    writes.next().await;
    let update = next_change(&mut stream).await;
    (switch, update)
}

/// The protobuf size of the next Change on the stream (skipping the snapshot and heartbeats).
async fn next_change(stream: &mut tonic::Streaming<pb::SyncMessage>) -> usize {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the change stream answers within 10 s")
            .unwrap_or_else(|status| panic!("the change stream failed: {status}"))
            .expect("the change stream stays open");
        if matches!(message.kind, Some(pb::sync_message::Kind::Change(_))) {
            return message.encoded_len();
        }
    }
}

/// Spawns a replica following `upstream`, serving replication itself if `serve`.
fn spawn(bench: &Bench, dir: &Path, upstream: &str, name: &str, serve: bool) -> support::Replica {
    support::spawn_replica_with(dir, &bench.tokens, upstream, name, None, |command| {
        if !bench.workers.is_empty() {
            command.env("TOKIO_WORKER_THREADS", &bench.workers);
        }
        if serve {
            command.arg("--serve-replication");
        }
    })
}

/// Waits for every replica's readiness (health service "") through the
/// health `Watch` stream, which pushes SERVING when it happens: no polling
/// load on replicas that are busy starting. `None` for a replica that was not
/// SERVING within `within`.
async fn wait_serving_all(addrs: Vec<String>, within: Duration) -> Vec<Option<Instant>> {
    let count = addrs.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, addr) in addrs.into_iter().enumerate() {
        tasks.spawn(async move {
            let serving = tokio::time::timeout(within, watch_serving(&addr)).await;
            (index, serving.ok().flatten())
        });
    }
    let mut serving = vec![None; count];
    while let Some(joined) = tasks.join_next().await {
        let (index, at) = joined.expect("a health watcher does not panic");
        serving[index] = at;
    }
    serving
}

/// The instant the replica at `addr` reported SERVING on its health Watch
/// stream, connecting as soon as it listens; `None` if the stream failed.
async fn watch_serving(addr: &str) -> Option<Instant> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("a loopback address is a valid URI");
    let channel = loop {
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let mut stream = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?
        .into_inner();
    while let Ok(Some(answer)) = stream.message().await {
        if answer.status == ServingStatus::Serving as i32 {
            return Some(Instant::now());
        }
    }
    None
}

/// Panics naming the replicas that did not reach SERVING.
fn assert_all_serving(serving: &[Option<Instant>], replicas: &[support::Replica]) {
    let missing: Vec<String> = serving
        .iter()
        .zip(replicas)
        .filter(|(at, _)| at.is_none())
        .map(|(_, replica)| {
            let log = std::fs::read_to_string(&replica.proc.log).unwrap_or_default();
            let last = log.lines().last().unwrap_or("(empty log)").to_string();
            format!("{} ({last})", replica.proc.name)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} replicas never reached SERVING: {}",
        missing.len(),
        missing.join(", ")
    );
}

/// Samples a process's `VmRSS` every 10 ms on its own thread, keeping the largest.
struct RssSampler {
    stop: Arc<AtomicBool>,
    max_kib: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max_kib = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, max_kib) = (stop.clone(), max_kib.clone());
            // Ends when `stop` is set.
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    max_kib.fetch_max(support::rss_kib(pid).0, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RssSampler {
            stop,
            max_kib,
            thread,
        }
    }

    /// Stops sampling and returns the largest `VmRSS` seen, in KiB.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the sampler does not panic");
        self.max_kib.load(Ordering::Relaxed)
    }
}

/// A subdirectory of the run directory for one part (its writer's data, logs).
fn subdir(bench: &Bench, name: &str) -> PathBuf {
    let path = bench.dir.path().join(name);
    std::fs::create_dir_all(&path).expect("the run directory is writable");
    path
}

/// A comma list of numbers from the environment, with a default.
fn list(name: &str, default: &str) -> Vec<usize> {
    let text = std::env::var(name).unwrap_or_else(|_| default.to_string());
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse()
                .unwrap_or_else(|_| panic!("{name}={text:?} is not a comma list of numbers"))
        })
        .collect()
}

/// Bytes sent so far (`bytes_sent` of `ss -ti`) over the established TCP
/// connections whose local port is `port`; `None` if `ss` cannot tell.
fn bytes_sent(port: u16) -> Option<u64> {
    let output = Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let counts: Vec<u64> = text
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("bytes_sent:")?.parse().ok())
        .collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

/// CPU time of each live thread of a process, in nanoseconds (the first field
/// of `/proc/<pid>/task/<tid>/schedstat`).
fn thread_cpu_ns(pid: u32) -> std::collections::HashMap<u32, u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process is alive");
    tasks
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(entry.path().join("schedstat")).ok()?;
            Some((tid, text.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// CPU the threads alive at `after` used since `before` (all of it for new threads).
fn thread_cpu_delta_ns(
    before: &std::collections::HashMap<u32, u64>,
    after: &std::collections::HashMap<u32, u64>,
) -> u64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// The number of threads of a process.
fn threads_of(pid: u32) -> u64 {
    proc_field(&format!("/proc/{pid}/status"), "Threads:")
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn mem_available() -> u64 {
    proc_field("/proc/meminfo", "MemAvailable:") * 1024
}

/// The first number after `name` in a `/proc` file of `name value` lines.
fn proc_field(path: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{path}: {error}"));
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{path} has no {name}"))
}

/// Slope and intercept of the least-squares line through `points`.
fn least_squares(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let covariance: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let variance: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let slope = covariance / variance;
    (slope, mean_y - slope * mean_x)
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(sum, count), v| (sum + v, count + 1));
    if count == 0 { 0.0 } else { sum / count as f64 }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
