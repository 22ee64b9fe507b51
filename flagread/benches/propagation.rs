//! Propagation: from a write's acknowledgement (FlagAdmin `SetFlagEnabled` or
//! `UpdateFlag` returns) to the change being applied on every one of 16
//! flagread processes, seen through each replica's `Watch` stream.
//!
//! Writes go one at a time, a few milliseconds apart, alternating between the
//! kill switch of an on/off flag and an `UpdateFlag` that moves the rollout of
//! the constrained flag. For each write the benchmark records when every
//! replica's Watch stream reported a revision at least the write's; the
//! propagation delay is the last of those instants minus the acknowledgement
//! (0 when every replica was faster than the acknowledgement).
//!
//! Run it with `scripts/bench-propagation.sh`, or `cargo bench -p flagread
//! --bench propagation` once flagwrite is built. Knobs (environment):
//! `BENCH_REPLICAS` (default 16), `BENCH_WRITES` (per round, default 300),
//! `BENCH_ROUNDS` (default 2).

mod support;

use std::time::{Duration, Instant};

use flagstream::pb;
use support::fixtures::{self, NAMESPACE};
use support::proc::{self, RunDir};
use support::stats::{median, percentile, runs};
use tokio::sync::mpsc;

/// One Watch event as received: which replica, the revision it reported, when.
type Seen = (usize, u64, Instant);

fn main() {
    if !support::started_by_cargo_bench("propagation") {
        return;
    }
    proc::watchdog(Duration::from_secs(10 * 60));
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    runtime.block_on(run());
}

async fn run() {
    let replica_count: usize = support::env_or("BENCH_REPLICAS", 16);
    let writes: usize = support::env_or("BENCH_WRITES", 300);
    let rounds: usize = support::env_or("BENCH_ROUNDS", 2);
    let dir = RunDir::new("propagation");
    let tokens = support::write_tokens(dir.path());

    let writer = support::start_writer(dir.path(), &tokens).await;
    let (mut changes, revision) = fixtures::Writes::load(&writer.addr, 350).await;

    let mut replicas: Vec<support::Replica> = (0..replica_count)
        .map(|index| {
            support::spawn_replica(
                dir.path(),
                &tokens,
                &writer.addr,
                &format!("flagread-{index}"),
            )
        })
        .collect();
    for replica in &mut replicas {
        support::wait_serving(
            &replica.addr,
            Duration::from_secs(60),
            Duration::from_millis(20),
        )
        .await;
        replica.proc.assert_alive();
    }

    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    for (index, replica) in replicas.iter().enumerate() {
        let mut client =
            support::eval_client(support::connect(&replica.addr, Duration::from_secs(5)).await);
        let mut stream = client
            .watch(pb::WatchRequest {
                namespace: NAMESPACE.to_string(),
                context: None,
                flag_keys: Vec::new(),
            })
            .await
            .unwrap_or_else(|status| panic!("Watch on flagread-{index} failed: {status}"))
            .into_inner();
        let seen_tx = seen_tx.clone();
        // Ends when the replica closes the stream or the benchmark stops listening.
        tokio::spawn(async move {
            while let Ok(Some(event)) = stream.message().await {
                if seen_tx
                    .send((index, event.revision, Instant::now()))
                    .is_err()
                {
                    break;
                }
            }
        });
    }
    drop(seen_tx);
    // Every replica must be at the imported revision before timing starts.
    let mut applied = vec![0u64; replica_count];
    wait_all(&mut seen, &mut applied, revision, Instant::now()).await;

    println!("machine: {}", support::machine_line());
    println!(
        "{replica_count} flagread processes + 1 flagwrite + this client on the same cores; {writes} writes per round"
    );
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut maxes = Vec::new();
    let mut first_p50s = Vec::new();
    let mut ack_p50s = Vec::new();
    let mut signed_p50s = Vec::new();
    for round in 0..rounds {
        let mut delays = Vec::with_capacity(writes);
        let mut first = Vec::with_capacity(writes);
        let mut acks = Vec::with_capacity(writes);
        let mut signed = Vec::with_capacity(writes);
        for _ in 0..writes {
            let sent = Instant::now();
            let revision = changes.next().await;
            let acked = Instant::now();
            let times = wait_all(&mut seen, &mut applied, revision, acked).await;
            let last = times.iter().max().copied().expect("at least one replica");
            let earliest = times.iter().min().copied().expect("at least one replica");
            delays.push(last.saturating_duration_since(acked).as_secs_f64() * 1000.0);
            signed.push(if last >= acked {
                last.duration_since(acked).as_secs_f64() * 1000.0
            } else {
                -(acked.duration_since(last).as_secs_f64() * 1000.0)
            });
            first.push(earliest.saturating_duration_since(acked).as_secs_f64() * 1000.0);
            acks.push(acked.duration_since(sent).as_secs_f64() * 1000.0);
            // Let the system settle so each write is measured on its own.
            tokio::time::sleep(Duration::from_millis(2 + fastrand::u64(0..4))).await;
        }
        for replica in &mut replicas {
            replica.proc.assert_alive();
        }
        let (p50, p99, max) = (
            percentile(&mut delays, 50.0),
            percentile(&mut delays, 99.0),
            percentile(&mut delays, 100.0),
        );
        let first_p50 = percentile(&mut first, 50.0);
        let ack_p50 = percentile(&mut acks, 50.0);
        let signed_p50 = percentile(&mut signed, 50.0);
        println!(
            "round {}: ack -> all {replica_count} applied: p50 {p50:.3} ms, p99 {p99:.3} ms, max {max:.3} ms (signed p50 {signed_p50:.3} ms: negative = all had applied before the ack arrived); ack -> first replica p50 {first_p50:.3} ms; write ack p50 {ack_p50:.3} ms",
            round + 1
        );
        p50s.push(p50);
        p99s.push(p99);
        maxes.push(max);
        first_p50s.push(first_p50);
        signed_p50s.push(signed_p50);
        ack_p50s.push(ack_p50);
    }
    println!();
    println!(
        "| propagation to {replica_count} replicas ({}) | median of rounds | runs |",
        support::machine_line()
    );
    println!("|---|---:|---|");
    println!(
        "| ack -> applied on all, p50 | {:.2} ms | {} |",
        median(&p50s),
        runs(&p50s, 2)
    );
    println!(
        "| ack -> applied on all, p99 | {:.2} ms | {} |",
        median(&p99s),
        runs(&p99s, 2)
    );
    println!(
        "| ack -> applied on all, max | {:.2} ms | {} |",
        median(&maxes),
        runs(&maxes, 2)
    );
    println!(
        "| last replica applied, relative to the ack, p50 (negative: before the ack) | {:.2} ms | {} |",
        median(&signed_p50s),
        runs(&signed_p50s, 2)
    );
    println!(
        "| ack -> applied on the first, p50 | {:.2} ms | {} |",
        median(&first_p50s),
        runs(&first_p50s, 2)
    );
    println!(
        "| write acknowledged (durable), p50 | {:.2} ms | {} |",
        median(&ack_p50s),
        runs(&ack_p50s, 2)
    );
    println!();
    println!(
        "targets: p50 {:.2} ms (<= 2 ms: {}), p99 {:.2} ms (<= 10 ms: {})",
        median(&p50s),
        if median(&p50s) <= 2.0 {
            "met"
        } else {
            "MISSED"
        },
        median(&p99s),
        if median(&p99s) <= 10.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    drop(replicas);
    drop(writer);
}

/// Reads Watch events until every replica has reported `revision` or later,
/// returning for each the instant it did (events that arrived before `since`
/// keep their own, earlier instant). Panics after 10 s naming the laggards.
async fn wait_all(
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    applied: &mut [u64],
    revision: u64,
    since: Instant,
) -> Vec<Instant> {
    let mut times: Vec<Option<Instant>> = applied
        .iter()
        .map(|&have| (have >= revision).then_some(since))
        .collect();
    // Events already queued carry their own arrival time, which may precede `since`.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while times.iter().any(Option::is_none) {
        let event = tokio::time::timeout_at(deadline, seen.recv()).await;
        let Ok(Some((index, reported, at))) = event else {
            let behind: Vec<String> = applied
                .iter()
                .enumerate()
                .filter(|(_, have)| **have < revision)
                .map(|(index, have)| format!("flagread-{index} at {have}"))
                .collect();
            panic!(
                "revision {revision} did not reach every replica within 10 s: {}",
                behind.join(", ")
            );
        };
        applied[index] = applied[index].max(reported);
        if reported >= revision && times[index].is_none() {
            times[index] = Some(at);
        }
    }
    times
        .into_iter()
        .map(|time| time.expect("every replica reported"))
        .collect()
}
