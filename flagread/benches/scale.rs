//! Scale: a replica holding 100,000 flags syncs cold (empty, no snapshot
//! file) from flagwrite, and its resident memory once it holds them.
//!
//! The flags are loaded into flagwrite with `ImportNamespace`, the fastest
//! path (one request, one transaction, one fsync per namespace): 20
//! namespaces of 5,000 mixed flags each, keeping every request under the
//! 4 MiB request limit. Then, in each round, a fresh flagread process starts
//! and the benchmark polls its health every 2 ms: the sync time runs from the
//! process's spawn to SERVING (health turns SERVING only once the whole state
//! is applied), so it includes the process start. Memory is `VmRSS` from
//! `/proc/<pid>/status` right after SERVING and again a second later, with
//! `VmHWM` (the peak).
//!
//! Run it with `scripts/bench-scale.sh`, or `cargo bench -p flagread --bench
//! scale` once flagwrite is built. Knobs (environment): `BENCH_FLAGS`
//! (default 100000), `BENCH_PER_NAMESPACE` (default 5000), `BENCH_ROUNDS`
//! (default 3).

mod support;

use std::time::{Duration, Instant};

use flagstream::pb;
use support::fixtures;
use support::proc::{self, RunDir};
use support::stats::{median, runs};

fn main() {
    if !support::started_by_cargo_bench("scale") {
        return;
    }
    proc::watchdog(Duration::from_secs(10 * 60));
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    runtime.block_on(run());
}

async fn run() {
    let total: usize = support::env_or("BENCH_FLAGS", 100_000);
    let per_namespace: usize = support::env_or("BENCH_PER_NAMESPACE", 5_000);
    let rounds: usize = support::env_or("BENCH_ROUNDS", 3);
    let dir = RunDir::new("scale");
    let tokens = support::write_tokens(dir.path());

    let writer = support::start_writer(dir.path(), &tokens).await;
    let mut admin =
        support::admin_client(support::connect(&writer.addr, Duration::from_secs(5)).await);
    let load_started = Instant::now();
    let mut head = 0;
    let mut loaded = 0;
    let mut namespaces = Vec::new();
    while loaded < total {
        let count = per_namespace.min(total - loaded);
        let namespace = format!("scale-{:03}", namespaces.len());
        head = fixtures::import(
            &mut admin,
            &namespace,
            fixtures::mixed_namespace(&namespace, count),
        )
        .await;
        namespaces.push((namespace, count));
        loaded += count;
    }
    let load_time = load_started.elapsed();

    println!("machine: {}", support::machine_line());
    println!(
        "loaded {loaded} flags into flagwrite with {} ImportNamespace calls in {:.2} s ({:.0} flags/s), head revision {head}",
        namespaces.len(),
        load_time.as_secs_f64(),
        loaded as f64 / load_time.as_secs_f64()
    );
    let mut syncs = Vec::new();
    let mut rss_now = Vec::new();
    let mut rss_settled = Vec::new();
    let mut peaks = Vec::new();
    let mut streams = Vec::new();
    for round in 0..rounds {
        let name = format!("flagread-{round}");
        let spawned = Instant::now();
        let mut replica = support::spawn_replica(dir.path(), &tokens, &writer.addr, &name);
        let serving = support::wait_serving(
            &replica.addr,
            Duration::from_secs(60),
            Duration::from_millis(2),
        )
        .await;
        let sync = serving.duration_since(spawned).as_secs_f64();
        let (rss, _) = support::rss_kib(replica.proc.pid());
        check_holds(&replica.addr, &namespaces, head).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        replica.proc.assert_alive();
        let (settled, peak) = support::rss_kib(replica.proc.pid());
        drop(replica);
        let stream = snapshot_stream(&writer.addr).await;
        println!(
            "round {}: cold sync of {loaded} flags {:.3} s; RSS at SERVING {:.1} MB, 1 s later {:.1} MB, peak {:.1} MB; the writer's snapshot stream alone then took {stream:.3} s",
            round + 1,
            sync,
            mib(rss),
            mib(settled),
            mib(peak)
        );
        streams.push(stream);
        syncs.push(sync);
        rss_now.push(mib(rss));
        rss_settled.push(mib(settled));
        peaks.push(mib(peak));
    }
    println!();
    println!(
        "| replica with {loaded} flags ({}) | median | runs |",
        support::machine_line()
    );
    println!("|---|---:|---|");
    println!(
        "| cold sync (spawn -> SERVING) | {:.2} s | {} |",
        median(&syncs),
        runs(&syncs, 2)
    );
    println!(
        "| RSS at SERVING | {:.0} MB | {} |",
        median(&rss_now),
        runs(&rss_now, 0)
    );
    println!(
        "| RSS 1 s later | {:.0} MB | {} |",
        median(&rss_settled),
        runs(&rss_settled, 0)
    );
    println!(
        "| peak RSS (VmHWM) | {:.0} MB | {} |",
        median(&peaks),
        runs(&peaks, 0)
    );
    println!(
        "| writer's snapshot stream alone (Subscribe from 0 to SnapshotEnd, after each round) | {:.2} s | {} |",
        median(&streams),
        runs(&streams, 2)
    );
    println!(
        "| loading flagwrite ({} x ImportNamespace) | {:.1} s | {:.0} flags/s |",
        namespaces.len(),
        load_time.as_secs_f64(),
        loaded as f64 / load_time.as_secs_f64()
    );
    println!();
    let worst_rss = rss_now
        .iter()
        .chain(&rss_settled)
        .copied()
        .fold(0.0, f64::max);
    println!(
        "targets: cold sync {:.2} s (<= 2 s: {}), RSS {worst_rss:.0} MB at most (< 300 MB: {})",
        median(&syncs),
        if median(&syncs) <= 2.0 {
            "met"
        } else {
            "MISSED"
        },
        if worst_rss < 300.0 { "met" } else { "MISSED" }
    );
    drop(writer);
}

/// Subscribes to the writer's change stream from revision 0 like a new
/// replica and times the snapshot (SnapshotBegin … SnapshotEnd) without
/// applying it: the writer's and the network's share of a cold sync.
async fn snapshot_stream(writer: &str) -> f64 {
    use pb::sync_message::Kind;
    let mut client = support::sync_client(writer).await;
    let started = Instant::now();
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            from_revision: 0,
            namespaces: Vec::new(),
            chain: Vec::new(),
        })
        .await
        .unwrap_or_else(|status| panic!("Subscribe failed: {status}"))
        .into_inner();
    while let Some(message) = stream
        .message()
        .await
        .unwrap_or_else(|status| panic!("the change stream failed: {status}"))
    {
        if matches!(message.kind, Some(Kind::SnapshotEnd(_))) {
            return started.elapsed().as_secs_f64();
        }
    }
    panic!("the change stream ended before SnapshotEnd");
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Checks the replica really holds everything: `EvaluateAll` of the last
/// namespace returns all its flags at the head revision.
async fn check_holds(addr: &str, namespaces: &[(String, usize)], head: u64) {
    let mut client = support::eval_client(support::connect(addr, Duration::from_secs(5)).await);
    let (namespace, count) = namespaces.last().expect("at least one namespace");
    let answer = client
        .evaluate_all(pb::EvaluateAllRequest {
            namespace: namespace.clone(),
            context: Some(fixtures::context()),
            min_revision: head,
        })
        .await
        .unwrap_or_else(|status| panic!("EvaluateAll on {namespace} failed: {status}"))
        .into_inner();
    assert_eq!(
        answer.results.len(),
        *count,
        "the replica holds {} flags of {namespace}",
        answer.results.len()
    );
    assert!(
        answer.revision >= head,
        "the replica is at {} < {head}",
        answer.revision
    );
}
