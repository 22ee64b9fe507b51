//! Soak: one flagwrite and two flagread processes under mixed load for a long
//! while (10 minutes by default), with writes all along and the second
//! replica killed and restarted every minute. Reports evaluation and write
//! errors, the replicas' convergence at the end (GetStateDigest against the
//! writer's), and the resident memory of the writer and of the replica that
//! stays up: first and last samples and the slope over the second half of the
//! run, which should be about flat for a process that keeps no more than it
//! holds.
//!
//! Run it with `cargo bench -p flagread --bench soak`. Knobs (environment):
//! `BENCH_SOAK_S` (default 600), `BENCH_SOAK_RATE` (evaluations per second
//! per load task, 4 tasks, default 250), `BENCH_SOAK_WRITES` (writes per
//! second, default 10), `BENCH_SOAK_RESTART_S` (default 60).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flagstream::pb;
use support::fixtures::{self, NAMESPACE};
use support::proc::{self, RunDir};

/// Flags whose kill switch the writers flip.
const SWITCHES: [&str; 4] = ["flag-00002", "flag-00005", "flag-00008", "flag-00011"];

fn main() {
    if !support::started_by_cargo_bench("soak") {
        return;
    }
    let seconds: u64 = support::env_or("BENCH_SOAK_S", 600);
    proc::watchdog(Duration::from_secs(seconds + 300));
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    runtime.block_on(run(Duration::from_secs(seconds)));
}

#[derive(Default)]
struct Counts {
    evaluations: AtomicU64,
    evaluation_errors: AtomicU64,
    /// Failed evaluations by status code, for the report.
    evaluation_codes: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    writes: AtomicU64,
    write_errors: AtomicU64,
}

async fn run(length: Duration) {
    let rate: u64 = support::env_or("BENCH_SOAK_RATE", 250);
    let write_rate: u64 = support::env_or("BENCH_SOAK_WRITES", 10);
    let restart_every = Duration::from_secs(support::env_or("BENCH_SOAK_RESTART_S", 60));
    let dir = RunDir::new("soak");
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
    let steady = support::spawn_replica(dir.path(), &tokens, &writer.addr, "flagread-steady");
    let mut restarted =
        support::spawn_replica(dir.path(), &tokens, &writer.addr, "flagread-restarted");
    for addr in [&steady.addr, &restarted.addr] {
        support::wait_serving(addr, Duration::from_secs(60), Duration::from_millis(20)).await;
    }
    println!("machine: {}", support::machine_line());
    println!(
        "soak: {length:?}, 4 x {rate} evaluations/s on the steady replica, {write_rate} writes/s, the other replica restarted every {restart_every:?}"
    );

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..4u64 {
        let mut client =
            support::eval_client(support::connect(&steady.addr, Duration::from_secs(5)).await);
        let (counts, stop) = (counts.clone(), stop.clone());
        // Ends when `stop` is set.
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1) as u32);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let result = if (n + task).is_multiple_of(10) {
                    client
                        .evaluate_all(pb::EvaluateAllRequest {
                            namespace: NAMESPACE.into(),
                            context: Some(fixtures::context()),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                } else {
                    client
                        .evaluate(pb::EvaluateRequest {
                            namespace: NAMESPACE.into(),
                            flag_key: format!("flag-{:05}", 1 + n % 349),
                            context: Some(fixtures::context()),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                };
                counts.evaluations.fetch_add(1, Ordering::Relaxed);
                if let Err(status) = result {
                    counts.evaluation_errors.fetch_add(1, Ordering::Relaxed);
                    *counts
                        .evaluation_codes
                        .lock()
                        .unwrap()
                        .entry(format!("{:?}: {}", status.code(), status.message()))
                        .or_default() += 1;
                }
            }
        }));
    }
    {
        let (counts, stop) = (counts.clone(), stop.clone());
        let mut admin = admin.clone();
        // Ends when `stop` is set.
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / write_rate.max(1) as u32);
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let result = admin
                    .set_flag_enabled(pb::SetFlagEnabledRequest {
                        namespace: NAMESPACE.into(),
                        key: SWITCHES[n % SWITCHES.len()].into(),
                        enabled: n.is_multiple_of(2),
                        ..Default::default()
                    })
                    .await;
                counts.writes.fetch_add(1, Ordering::Relaxed);
                if result.is_err() {
                    counts.write_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    let started = Instant::now();
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let mut restarts = 0;
    let mut last_restart = Instant::now();
    while started.elapsed() < length {
        tokio::time::sleep(Duration::from_secs(5)).await;
        samples.push((
            started.elapsed().as_secs_f64() / 60.0,
            support::rss_kib(writer.proc.pid()).0,
            support::rss_kib(steady.proc.pid()).0,
        ));
        if last_restart.elapsed() >= restart_every {
            drop(restarted);
            restarted =
                support::spawn_replica(dir.path(), &tokens, &writer.addr, "flagread-restarted");
            support::wait_serving(
                &restarted.addr,
                Duration::from_secs(60),
                Duration::from_millis(20),
            )
            .await;
            restarts += 1;
            last_restart = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("a load task ends cleanly");
    }

    // Convergence: both replicas reach the writer's revision, history position and digest.
    let want = admin
        .get_state_digest(pb::GetStateDigestRequest::default())
        .await
        .expect("the writer's digest")
        .into_inner();
    let mut converged = Vec::new();
    for addr in [&steady.addr, &restarted.addr] {
        let mut client = support::eval_client(support::connect(addr, Duration::from_secs(5)).await);
        let deadline = Instant::now() + Duration::from_secs(10);
        let same = loop {
            let got = client
                .get_state_digest(pb::GetStateDigestRequest::default())
                .await
                .map(|r| r.into_inner());
            match got {
                Ok(got)
                    if (got.revision, &got.chain, &got.digest)
                        == (want.revision, &want.chain, &want.digest) =>
                {
                    break true;
                }
                _ if Instant::now() > deadline => break false,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        converged.push(same);
    }

    let c = &counts;
    println!(
        "evaluations: {} ({} failed); writes: {} ({} failed); replica restarts: {restarts}; converged: steady {}, restarted {}",
        c.evaluations.load(Ordering::Relaxed),
        c.evaluation_errors.load(Ordering::Relaxed),
        c.writes.load(Ordering::Relaxed),
        c.write_errors.load(Ordering::Relaxed),
        converged[0],
        converged[1],
    );
    for (what, count) in c.evaluation_codes.lock().unwrap().iter() {
        println!("  failed evaluations: {count} x {what}");
    }
    for (name, column) in [("flagwrite", 1), ("flagread (steady)", 2)] {
        let series: Vec<(f64, f64)> = samples
            .iter()
            .map(|s| (s.0, if column == 1 { s.1 } else { s.2 } as f64 / 1024.0))
            .collect();
        let half = &series[series.len() / 2..];
        println!(
            "{name}: RSS {:.1} MiB at the first sample, {:.1} MiB at the last; slope over the second half {:+.3} MiB/min",
            series.first().map_or(0.0, |s| s.1),
            series.last().map_or(0.0, |s| s.1),
            slope(half),
        );
    }
}

/// The least-squares slope of `points` (x, y).
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let num: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let den: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}
