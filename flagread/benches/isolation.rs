//! Isolation: the latency of `Evaluate` calls on one namespace while a 20,000-flag import into
//! other namespaces is written, replicated and applied on the same replica.
//!
//! One flagwrite and one flagread process; by default the replica runs alone on CPU 0 with one
//! async worker, as on a one-CPU pod, and the writer and this client on CPU 1
//! (`BENCH_LAYOUT=shared` leaves all of them on both CPUs). Four client tasks call `Evaluate` (the constrained
//! flag of a 350-flag namespace, as in `read_load`) back to back and record each call's latency
//! and when it was sent. Each round first records a quiet window of 2 s, then imports 20,000
//! flags (four `ImportNamespace` calls of 5,000 into fresh namespaces, sent at once, since one
//! request is capped at 4 MiB) and records the window from the first import sent to the last
//! import applied on the replica (seen with `min_revision`). The table gives each window's
//! p50/p99/max, median over rounds.
//!
//! Run it with `scripts/bench-isolation.sh`, or `cargo bench -p flagread --bench isolation`
//! once both binaries are built in the bench profile. Knobs (environment): `BENCH_ROUNDS`
//! (default 3), `BENCH_IMPORT_FLAGS` (default 20000), `BENCH_CLIENTS` (default 4),
//! `BENCH_LAYOUT` (`pinned` or `shared`).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flagstream::pb;
use support::fixtures::{self, CONSTRAINED_FLAG, NAMESPACE};
use support::proc::{self, RunDir};
use support::stats::{median, percentile, runs};

/// Flags per `ImportNamespace` call.
const PER_IMPORT: usize = 5_000;

/// In the pinned layout: the replica's CPU, and everyone else's.
const SERVER_CPU: usize = 0;
const LOAD_CPU: usize = 1;

fn main() {
    if !support::started_by_cargo_bench("isolation") {
        return;
    }
    proc::watchdog(Duration::from_secs(10 * 60));
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    runtime.block_on(run());
}

/// Calls as sent: when, and how long they took (ms).
type Samples = Arc<Mutex<Vec<(Instant, f64)>>>;

async fn run() {
    let rounds: usize = support::env_or("BENCH_ROUNDS", 3);
    let import_flags: usize = support::env_or("BENCH_IMPORT_FLAGS", 20_000);
    let clients: usize = support::env_or("BENCH_CLIENTS", 4);
    let pinned = support::env_or("BENCH_LAYOUT", "pinned".to_string()) != "shared";
    let dir = RunDir::new("isolation");
    let tokens = support::write_tokens(dir.path());
    let writer = support::start_writer(dir.path(), &tokens).await;
    let mut admin =
        support::admin_client(support::connect(&writer.addr, Duration::from_secs(5)).await);
    fixtures::import(
        &mut admin,
        NAMESPACE,
        fixtures::mixed_namespace(NAMESPACE, 350),
    )
    .await;
    if pinned {
        support::paced::pin(&std::process::id().to_string(), LOAD_CPU, true);
        support::paced::pin(&writer.proc.pid().to_string(), LOAD_CPU, true);
    }
    let mut replica = support::spawn_replica_on(
        dir.path(),
        &tokens,
        &writer.addr,
        "flagread",
        pinned.then_some(SERVER_CPU),
    );
    support::wait_serving(
        &replica.addr,
        Duration::from_secs(60),
        Duration::from_millis(20),
    )
    .await;
    let channel = support::connect(&replica.addr, Duration::from_secs(5)).await;

    let samples: Samples = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let mut client = support::eval_client(channel.clone());
        let (samples, stop) = (samples.clone(), stop.clone());
        load.spawn(async move {
            let request = pb::EvaluateRequest {
                namespace: NAMESPACE.to_string(),
                flag_key: CONSTRAINED_FLAG.to_string(),
                context: Some(fixtures::context()),
                ..Default::default()
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sent = Instant::now();
                client
                    .evaluate(request.clone())
                    .await
                    .unwrap_or_else(|status| panic!("Evaluate failed: {status}"));
                let ms = sent.elapsed().as_secs_f64() * 1000.0;
                samples.lock().unwrap().push((sent, ms));
            }
        });
    }

    println!("machine: {}", support::machine_line());
    println!(
        "{}; {clients} clients calling Evaluate back to back; {import_flags} flags imported per round",
        if pinned {
            "flagread alone on CPU 0 (one async worker), flagwrite and this client on CPU 1"
        } else {
            "1 flagwrite + 1 flagread + this client on the same cores"
        }
    );
    let mut rows: Vec<[f64; 7]> = Vec::new();
    for round in 0..rounds {
        // The quiet window.
        let quiet_from = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let quiet = window(&samples, quiet_from, Instant::now());

        // The import window: from the first import sent to the last applied on the replica.
        let imported_from = Instant::now();
        let mut imports = tokio::task::JoinSet::new();
        for part in 0..import_flags.div_ceil(PER_IMPORT) {
            let namespace = format!("bulk-{round}-{part}");
            let count = PER_IMPORT.min(import_flags - part * PER_IMPORT);
            let flags = fixtures::mixed_namespace(&namespace, count);
            let mut admin = admin.clone();
            imports.spawn(async move { fixtures::import(&mut admin, &namespace, flags).await });
        }
        let mut head = 0;
        while let Some(revision) = imports.join_next().await {
            head = head.max(revision.expect("an import task"));
        }
        let mut probe = support::eval_client(channel.clone());
        let mut request = tonic::Request::new(pb::EvaluateRequest {
            namespace: NAMESPACE.to_string(),
            flag_key: CONSTRAINED_FLAG.to_string(),
            min_revision: head,
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(60));
        probe
            .evaluate(request)
            .await
            .unwrap_or_else(|status| panic!("the import was not applied: {status}"));
        let applied = Instant::now();
        let busy = window(&samples, imported_from, applied);
        replica.proc.assert_alive();
        println!(
            "round {}: quiet p50 {:.3} ms p99 {:.3} ms max {:.3} ms ({} calls); during the import ({:.2} s to write and apply) p50 {:.3} ms p99 {:.3} ms max {:.3} ms ({} calls)",
            round + 1,
            quiet.0,
            quiet.1,
            quiet.2,
            quiet.3,
            applied.duration_since(imported_from).as_secs_f64(),
            busy.0,
            busy.1,
            busy.2,
            busy.3,
        );
        rows.push([
            quiet.0,
            quiet.1,
            quiet.2,
            busy.0,
            busy.1,
            busy.2,
            applied.duration_since(imported_from).as_secs_f64(),
        ]);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while load.join_next().await.is_some() {}

    let column = |i: usize| rows.iter().map(|r| r[i]).collect::<Vec<f64>>();
    println!();
    println!(
        "| Evaluate of another namespace ({}, {}) | p50 ms | p99 ms | max ms | runs (p99) |",
        support::machine_line(),
        if pinned { "pinned" } else { "shared" }
    );
    println!("|---|---:|---:|---:|---|");
    println!(
        "| quiet | {:.3} | {:.3} | {:.3} | {} |",
        median(&column(0)),
        median(&column(1)),
        median(&column(2)),
        runs(&column(1), 3)
    );
    println!(
        "| while {import_flags} flags are imported and applied ({:.2} s) | {:.3} | {:.3} | {:.3} | {} |",
        median(&column(6)),
        median(&column(3)),
        median(&column(4)),
        median(&column(5)),
        runs(&column(4), 3)
    );
}

/// p50, p99, max (ms) and count of the calls sent in `[from, to)`.
fn window(samples: &Samples, from: Instant, to: Instant) -> (f64, f64, f64, usize) {
    let mut latencies: Vec<f64> = samples
        .lock()
        .unwrap()
        .iter()
        .filter(|(sent, _)| *sent >= from && *sent < to)
        .map(|(_, ms)| *ms)
        .collect();
    assert!(!latencies.is_empty(), "no call was answered in the window");
    let count = latencies.len();
    (
        percentile(&mut latencies, 50.0),
        percentile(&mut latencies, 99.0),
        percentile(&mut latencies, 100.0),
        count,
    )
}
