//! Load test of the read path, in one run: a bare tonic unary echo server,
//! flagread `Evaluate` on a flag with constraints and a rollout, and
//! `EvaluateAll` over 350 flags, each driven by h2load with a pre-encoded gRPC
//! frame; then the latency of each at 70% of its maximum rate.
//!
//! Run it with `scripts/bench-read.sh` (which installs h2load and builds the
//! binaries) or `cargo bench -p flagread --bench read_load` once both are there.
//!
//! It measures two layouts of the same two CPUs, one after the other:
//!
//! - **shared**: servers and h2load share both cores, as on a developer
//!   laptop. The throughput targets (Evaluate vs echo, EvaluateAll calls/s)
//!   are read here. Latency at 70% uses h2load's `--rps`, whose 10 ms ticks
//!   send each tick's requests at once (see `support::h2load::Pacing`), so
//!   its p99 is mostly the burst; it is reported, not held to the target.
//! - **pinned**: each server confined to CPU 0 (one tokio worker), the
//!   writer, h2load and the load generator on CPU 1: a server with a core of
//!   its own, as on a one-CPU pod, and clients that do not take it from it. Its maximum rate is
//!   measured again with h2load, and then with the open-loop generator that
//!   spreads requests evenly and times each from when it was due
//!   (`support::paced`): the highest rate it sustains, found by bisection.
//!   Calls that arrive one by one cost the server more than h2load's
//!   pipelined ones, so that maximum is lower (71–94% of h2load's here).
//!   Latency is measured with the open-loop generator at 70% of each maximum.
//!   The latency target is read at 70% of the open-loop maximum: the rate
//!   and the latency then come from the same arrivals, so 70% means 70% of
//!   what the server sustains under them. At 70% of h2load's maximum the
//!   open-loop load is 74–99% of that, and the bare echo misses 5 ms too.
//!
//! Knobs (environment): `BENCH_LAYOUT` (`shared`, `pinned`, or both
//! comma-separated, default both), `BENCH_SECONDS` (measured seconds per run,
//! default 8), `BENCH_ROUNDS` (interleaved throughput runs per target,
//! default 3), `BENCH_CLIENTS` (connections, default 16), `BENCH_STREAMS`
//! (streams in flight per connection, default 16), `BENCH_FLAGS` (flags in the
//! EvaluateAll namespace, default 350), `BENCH_LATENCY_ROUNDS` (paced runs per
//! target, default 5), `BENCH_ONLY` (one of `echo`, `Evaluate`,
//! `EvaluateAll`: measure only it). For the shared layout's h2load latency:
//! `BENCH_LATENCY_PROCESSES` (h2load processes the paced connections are
//! split over, started staggered, default 1) and `BENCH_LATENCY_STREAMS`
//! (streams per connection, default `BENCH_STREAMS`). h2load times a request
//! from when it gets a stream, so with few streams the wait for one is not
//! counted; `BENCH_LATENCY_STREAMS=300` leaves every burst a stream, and
//! `BENCH_LATENCY_PROCESSES=8` spreads the bursts over the tick (see the
//! README's performance section for both).

mod support;

use std::time::Duration;

use flagstream::pb;
use prost::Message;
use support::fixtures::{self, CONSTRAINED_FLAG, NAMESPACE};
use support::grpc_raw::{self, ECHO_PATH, EchoMessage};
use support::h2load::{self, Load, Pacing};
use support::paced::{self, Paced};
use support::proc::{self, Proc, RunDir};
use support::stats::{median, percentile, runs};

/// One thing h2load is pointed at.
struct Target {
    name: &'static str,
    addr: String,
    path: &'static str,
    /// The request body, protobuf-encoded.
    body: Vec<u8>,
    /// Whether the server wants the eval token.
    authorized: bool,
    /// Length of the (constant) response body, learnt by the check call.
    response_len: usize,
    /// The server process, for its CPU time.
    pid: u32,
    /// Requests/s of each throughput run.
    max_rps: Vec<f64>,
    /// Server CPU microseconds per request of each throughput run.
    cpu_us: Vec<f64>,
    /// Each latency run at 70% of the maximum.
    paced: Vec<LatencyRun>,
    /// The pinned layout's open-loop maximum (`open_loop_max`), if searched.
    open_max: Option<OpenMax>,
    /// Each latency run at 70% of the open-loop maximum.
    paced_open: Vec<LatencyRun>,
}

/// The highest rate the open-loop generator found a server to sustain.
#[derive(Debug, Clone, Copy)]
struct OpenMax {
    rate: f64,
    /// The server's maximum may be higher: the search's upper end (1.2 times
    /// h2load's) was sustained, or the generator itself used most of its
    /// core at the first rate above `rate`.
    may_be_higher: bool,
}

/// One latency run: the rate offered and its percentiles (ms).
struct LatencyRun {
    rate: f64,
    p50: f64,
    p99: f64,
    /// The open-loop generator's p99.9 (h2load's log is not used for it).
    p999: Option<f64>,
}

/// Where the servers and the load run (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Shared,
    Pinned,
}

/// The CPU the pinned layout's servers run on; everything else runs on
/// [`LOAD_CPU`].
const SERVER_CPU: usize = 0;
const LOAD_CPU: usize = 1;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|arg| arg == "--echo-server") {
        let addr = args
            .get(at + 1)
            .and_then(|a| a.parse().ok())
            .expect("--echo-server <addr>");
        grpc_raw::serve_echo(addr);
        return;
    }
    if !support::started_by_cargo_bench("read_load") {
        return;
    }
    proc::watchdog(Duration::from_secs(15 * 60));
    h2load::require();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    runtime.block_on(run());
}

async fn run() {
    let flag_count: usize = support::env_or("BENCH_FLAGS", 350);
    let layouts: Vec<Layout> = std::env::var("BENCH_LAYOUT")
        .unwrap_or_else(|_| "shared,pinned".to_string())
        .split(',')
        .map(|name| match name.trim() {
            "shared" => Layout::Shared,
            "pinned" => Layout::Pinned,
            other => panic!("BENCH_LAYOUT: {other:?} is neither shared nor pinned"),
        })
        .collect();
    let dir = RunDir::new("read");
    let tokens = support::write_tokens(dir.path());

    let writer = support::start_writer(dir.path(), &tokens).await;
    let mut admin =
        support::admin_client(support::connect(&writer.addr, Duration::from_secs(5)).await);
    let revision = fixtures::import(
        &mut admin,
        NAMESPACE,
        fixtures::mixed_namespace(NAMESPACE, flag_count),
    )
    .await;
    println!("machine: {}", support::machine_line());
    for layout in layouts {
        if layout == Layout::Pinned {
            let cpus = std::thread::available_parallelism().map_or(1, usize::from);
            if cpus < 2 {
                println!("pinned layout skipped: it needs 2 CPUs, this process may use {cpus}");
                continue;
            }
            // The benchmark (and so every h2load it starts) and the writer
            // move to the load CPU; the servers start on the other one.
            paced::pin(&std::process::id().to_string(), LOAD_CPU, true);
            paced::pin(&writer.proc.pid().to_string(), LOAD_CPU, true);
        }
        measure(
            layout,
            dir.path(),
            &tokens,
            &writer.addr,
            revision,
            flag_count,
        )
        .await;
    }
    drop(writer);
}

/// Starts an echo server and a replica laid out as `layout` says, measures
/// all three targets and prints the report.
async fn measure(
    layout: Layout,
    dir: &std::path::Path,
    tokens: &std::path::Path,
    writer: &str,
    revision: u64,
    flag_count: usize,
) {
    let seconds: u32 = support::env_or("BENCH_SECONDS", 8);
    let rounds: usize = support::env_or("BENCH_ROUNDS", 3);
    let clients: u32 = support::env_or("BENCH_CLIENTS", 16);
    let streams: u32 = support::env_or("BENCH_STREAMS", 16);
    let latency_rounds: usize = support::env_or("BENCH_LATENCY_ROUNDS", 5);
    let processes: u32 = support::env_or("BENCH_LATENCY_PROCESSES", 1);
    let paced_streams: u32 = support::env_or("BENCH_LATENCY_STREAMS", streams);
    let server_cpu = (layout == Layout::Pinned).then_some(SERVER_CPU);
    let name = match layout {
        Layout::Shared => "flagread",
        Layout::Pinned => "flagread-pinned",
    };

    let mut replica = support::spawn_replica_on(dir, tokens, writer, name, server_cpu);
    support::wait_serving(
        &replica.addr,
        Duration::from_secs(30),
        Duration::from_millis(10),
    )
    .await;
    replica.proc.assert_alive();

    let echo_addr = format!("127.0.0.1:{}", proc::free_port());
    let exe = std::env::current_exe().expect("the benchmark knows its path");
    let mut echo_command = proc::command_on(server_cpu, exe);
    echo_command.arg("--echo-server").arg(&echo_addr);
    let echo_proc = Proc::spawn(&format!("echo-{name}"), echo_command, dir);
    support::connect(&echo_addr, Duration::from_secs(10)).await;

    let context = rollout_context(&replica.addr, revision).await;
    let evaluate = pb::EvaluateRequest {
        namespace: NAMESPACE.to_string(),
        flag_key: CONSTRAINED_FLAG.to_string(),
        context: Some(context.clone()),
        expected_type: 0,
        min_revision: 0,
    }
    .encode_to_vec();
    let evaluate_all = pb::EvaluateAllRequest {
        namespace: NAMESPACE.to_string(),
        context: Some(context),
        min_revision: 0,
    }
    .encode_to_vec();
    // The echo request carries as many bytes as the Evaluate request, so both
    // servers decode and encode messages of about the same size.
    let echo = EchoMessage {
        payload: evaluate.clone(),
    }
    .encode_to_vec();
    let mut targets = vec![
        target("echo", &echo_addr, echo_proc.pid(), ECHO_PATH, echo, false),
        target(
            "Evaluate",
            &replica.addr,
            replica.proc.pid(),
            "/flagstream.v1.FlagEval/Evaluate",
            evaluate,
            true,
        ),
        target(
            "EvaluateAll",
            &replica.addr,
            replica.proc.pid(),
            "/flagstream.v1.FlagEval/EvaluateAll",
            evaluate_all,
            true,
        ),
    ];
    // `BENCH_ONLY=EvaluateAll` (say) measures one target, e.g. under a profiler.
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        targets.retain(|target| target.name == only);
        assert!(
            !targets.is_empty(),
            "BENCH_ONLY={only:?} names none of echo, Evaluate, EvaluateAll"
        );
    }
    for target in &mut targets {
        let body = check_call(target).await;
        check_answer(target, &body, flag_count);
        target.response_len = body.len();
    }

    println!();
    match layout {
        Layout::Shared => println!(
            "layout shared: servers and h2load share the cores; h2load: 1 thread, {clients} connections x {streams} streams, {seconds} s measured after a 1 s warm-up run, {rounds} rounds"
        ),
        Layout::Pinned => println!(
            "layout pinned: each server on CPU {SERVER_CPU} (one worker), h2load, the generator and the writer on CPU {LOAD_CPU}; h2load: 1 thread, {clients} connections x {streams} streams, {seconds} s measured after a 1 s warm-up run, {rounds} rounds"
        ),
    }
    for round in 0..rounds {
        for target in &mut targets {
            let frame = write_frame(dir, target);
            load(target, &frame, clients, streams, 1, Pacing::Max, None)
                .run(dir, "h2load")
                .check(target.name, target.response_len);
            let cpu_before = support::cpu_seconds(target.pid);
            let outcome = load(target, &frame, clients, streams, seconds, Pacing::Max, None)
                .run(dir, "h2load");
            let cpu = support::cpu_seconds(target.pid) - cpu_before;
            outcome.check(target.name, target.response_len);
            let cpu_us = cpu * 1e6 / outcome.done as f64;
            println!(
                "round {}: {:<12} {:>10.0} req/s, server CPU {cpu_us:.1} us/request ({:.2} cores)",
                round + 1,
                target.name,
                outcome.req_per_s,
                cpu / f64::from(seconds)
            );
            target.max_rps.push(outcome.req_per_s);
            target.cpu_us.push(cpu_us);
        }
        replica.proc.assert_alive();
    }
    match layout {
        Layout::Shared => {
            h2load_latency(
                &mut targets,
                dir,
                clients,
                paced_streams,
                seconds,
                latency_rounds,
                processes,
            );
        }
        Layout::Pinned => paced_latency(&mut targets, clients, seconds, latency_rounds),
    }
    replica.proc.assert_alive();
    report(layout, &targets, flag_count);
}

/// Latency at 70% of each target's maximum with h2load's `--rps` (the shared
/// layout).
fn h2load_latency(
    targets: &mut [Target],
    dir: &std::path::Path,
    clients: u32,
    paced_streams: u32,
    seconds: u32,
    latency_rounds: usize,
    processes: u32,
) {
    println!(
        "latency: {latency_rounds} runs per target at 70% of its median maximum, h2load --rps (each process releases its connections' due requests every 10 ms), {processes} process(es) started 10/{processes} ms apart, {paced_streams} streams per connection"
    );
    for round in 0..latency_rounds {
        for target in targets.iter_mut() {
            let per_client =
                ((0.7 * median(&target.max_rps) / f64::from(clients)).round() as u32).max(1);
            let rate = f64::from(per_client * clients);
            let frame = write_frame(dir, target);
            let paced = load(
                target,
                &frame,
                clients,
                paced_streams,
                seconds,
                Pacing::Rps(per_client),
                Some(dir.join("latency.log")),
            );
            let mut achieved = 0.0;
            let mut latencies = Vec::new();
            let mut phases = Vec::new();
            for (outcome, log) in paced.run_spread(dir, "h2load", processes) {
                outcome.check(target.name, target.response_len);
                achieved += outcome.req_per_s;
                latencies.extend(h2load::latencies_ms(&log));
                phases.push(h2load::tick_phase_ms(&log));
            }
            if processes > 1 {
                phases.sort_by(f64::total_cmp);
                let phases: Vec<String> = phases.iter().map(|p| format!("{p:.1}")).collect();
                println!("  h2load processes tick at {} ms", phases.join(" "));
            }
            let p50 = percentile(&mut latencies, 50.0);
            let p99 = percentile(&mut latencies, 99.0);
            println!(
                "round {}: {:<12} at {rate:>7.0} req/s offered ({achieved:.0} answered): p50 {p50:.3} ms, p99 {p99:.3} ms over {} requests",
                round + 1,
                target.name,
                latencies.len()
            );
            target.paced.push(LatencyRun {
                rate,
                p50,
                p99,
                p999: None,
            });
        }
    }
}

/// The open-loop maximum search: the median latency below which a rate
/// counts as sustained. A paced run past a server's capacity queues more for
/// its whole length, so its median jumps from a fraction of a millisecond to
/// tens of milliseconds; just below capacity it stays near the service time.
const SUSTAINED_P50_MS: f64 = 1.0;
/// Each search step's warm-up and measured time.
const SEARCH_WARM_UP: Duration = Duration::from_millis(500);
const SEARCH_MEASURED: Duration = Duration::from_secs(2);

/// The highest rate the open-loop generator can offer a server and have it
/// keep up: no call failed, at least 98% of the offered rate was answered and
/// the median stayed under [`SUSTAINED_P50_MS`]. h2load's maximum is not
/// this: its connections keep 16 calls each in flight, so the server reads
/// and writes many calls per system call, while calls that arrive one by one
/// each pay for their own (about 8 µs more for `EvaluateAll` here). Found by
/// bisection between half of and 1.2 times h2load's maximum, to 1% of it.
fn open_loop_max(target: &Target, clients: u32) -> OpenMax {
    let h2load_max = median(&target.max_rps);
    let step = |rate: f64| {
        let run = paced_run(target, clients, rate, SEARCH_WARM_UP, SEARCH_MEASURED);
        let sustained = run.failed == 0
            && run.answered_per_s >= 0.98 * rate
            && run.latency.p50 <= SUSTAINED_P50_MS;
        println!(
            "  {:<12} {} -> {}",
            target.name,
            run.describe(rate),
            if sustained {
                "sustained"
            } else {
                "not sustained"
            }
        );
        (sustained, run.generator_cores >= 0.9)
    };
    let mut low = 0.5 * h2load_max;
    while !step(low).0 && low > 0.05 * h2load_max {
        low /= 2.0;
    }
    let mut high = 1.2 * h2load_max;
    let (sustained, mut generator_bound) = step(high);
    if sustained {
        return OpenMax {
            rate: high,
            may_be_higher: true,
        };
    }
    while high - low > 0.01 * h2load_max {
        let middle = (low + high) / 2.0;
        match step(middle) {
            (true, _) => low = middle,
            (false, bound) => {
                high = middle;
                generator_bound = bound;
            }
        }
    }
    OpenMax {
        rate: low,
        may_be_higher: generator_bound,
    }
}

/// One open-loop run against a target, with the CPU each side used.
struct PacedRun {
    latency: LatencyRun,
    failed: u64,
    first_failure: Option<String>,
    answered_per_s: f64,
    requests: usize,
    server_cores: f64,
    generator_cores: f64,
    others_cores: f64,
    max_behind_ms: f64,
}

impl PacedRun {
    fn describe(&self, rate: f64) -> String {
        format!(
            "at {rate:>7.0} req/s ({:.0} answered): p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms over {} requests; cores used: server {:.2}, generator {:.2}, other processes {:.2}; generator at most {:.2} ms late",
            self.answered_per_s,
            self.latency.p50,
            self.latency.p99,
            self.latency.p999.unwrap_or(0.0),
            self.requests,
            self.server_cores,
            self.generator_cores,
            self.others_cores,
            self.max_behind_ms,
        )
    }
}

fn paced_run(
    target: &Target,
    clients: u32,
    rate: f64,
    warm_up: Duration,
    measured: Duration,
) -> PacedRun {
    let server_before = support::cpu_seconds(target.pid);
    let own_before = support::cpu_seconds(std::process::id());
    let others_before = support::others_cpu_seconds();
    let outcome = Paced {
        addr: target.addr.parse().expect("a socket address"),
        path: target.path,
        authorization: target
            .authorized
            .then(|| format!("Bearer {}", support::EVAL_SECRET)),
        frame: grpc_raw::frame(&target.body),
        // The message and gRPC's 5-byte prefix.
        response_len: target.response_len + 5,
        connections: clients as usize,
        rate,
        warm_up,
        measured,
        cpu: Some(LOAD_CPU),
    }
    .run();
    let window = (warm_up + measured).as_secs_f64();
    let server_cores = (support::cpu_seconds(target.pid) - server_before) / window;
    let generator_cores = (support::cpu_seconds(std::process::id()) - own_before) / window;
    let others_cores = (support::others_cpu_seconds() - others_before) / window;
    let mut latencies = outcome.latencies_ms;
    PacedRun {
        latency: LatencyRun {
            rate,
            p50: percentile(&mut latencies, 50.0),
            p99: percentile(&mut latencies, 99.0),
            p999: Some(percentile(&mut latencies, 99.9)),
        },
        failed: outcome.failed,
        first_failure: outcome.first_failure,
        answered_per_s: outcome.answered_per_s,
        requests: latencies.len(),
        server_cores,
        generator_cores,
        others_cores,
        max_behind_ms: outcome.max_behind_ms,
    }
}

/// Latency with the open-loop generator on the load CPU (the pinned layout):
/// each round, every target at 70% of h2load's maximum and then at 70% of its
/// open-loop maximum.
fn paced_latency(targets: &mut [Target], clients: u32, seconds: u32, latency_rounds: usize) {
    println!(
        "open-loop maximum: the highest rate at which every call is answered, >= 98% of it per second, with a median under {SUSTAINED_P50_MS} ms; bisection, {:.1} s per step",
        (SEARCH_WARM_UP + SEARCH_MEASURED).as_secs_f64()
    );
    for target in targets.iter_mut() {
        let found = open_loop_max(target, clients);
        println!(
            "{:<12} open-loop maximum {:.0} req/s ({:.0}% of h2load's){}",
            target.name,
            found.rate,
            100.0 * found.rate / median(&target.max_rps),
            if found.may_be_higher {
                "; the server's may be higher (the generator was at its limit, or the search's top rate was sustained)"
            } else {
                ""
            }
        );
        target.open_max = Some(found);
    }
    println!(
        "latency: {latency_rounds} runs per target at 70% of its median h2load maximum and at 70% of its open-loop maximum, open loop: requests spread evenly over {clients} connections, each timed from when it was due to its trailers, after a 1 s warm-up"
    );
    let measured = Duration::from_secs(u64::from(seconds));
    for round in 0..latency_rounds {
        for target in targets.iter_mut() {
            let of_h2load = 0.7 * median(&target.max_rps);
            let of_open = target.open_max.map(|open| 0.7 * open.rate);
            for (of_open_max, rate) in [(false, Some(of_h2load)), (true, of_open)] {
                let Some(rate) = rate else { continue };
                let basis = if of_open_max { "open-loop" } else { "h2load" };
                let run = paced_run(target, clients, rate, Duration::from_secs(1), measured);
                assert_eq!(
                    run.failed, 0,
                    "{}: {} paced calls failed, the first with {:?}",
                    target.name, run.failed, run.first_failure
                );
                println!(
                    "round {}: {:<12} 70% of {basis:<9} max {}",
                    round + 1,
                    target.name,
                    run.describe(rate)
                );
                if of_open_max {
                    target.paced_open.push(run.latency);
                } else {
                    target.paced.push(run.latency);
                }
            }
        }
    }
}

fn target(
    name: &'static str,
    addr: &str,
    pid: u32,
    path: &'static str,
    body: Vec<u8>,
    authorized: bool,
) -> Target {
    Target {
        name,
        addr: addr.to_string(),
        pid,
        cpu_us: Vec::new(),
        path,
        body,
        authorized,
        response_len: 0,
        max_rps: Vec::new(),
        paced: Vec::new(),
        open_max: None,
        paced_open: Vec::new(),
    }
}

fn load<'a>(
    target: &Target,
    frame: &'a std::path::Path,
    clients: u32,
    streams: u32,
    seconds: u32,
    pacing: Pacing,
    log_file: Option<std::path::PathBuf>,
) -> Load<'a> {
    let mut headers = Vec::new();
    if target.authorized {
        headers.push(format!("authorization: Bearer {}", support::EVAL_SECRET));
    }
    Load {
        url: format!("http://{}{}", target.addr, target.path),
        frame,
        headers,
        clients,
        streams,
        seconds,
        pacing,
        log_file,
    }
}

fn write_frame(dir: &std::path::Path, target: &Target) -> std::path::PathBuf {
    let path = dir.join(format!("{}.frame", target.name));
    std::fs::write(&path, grpc_raw::frame(&target.body)).expect("the run directory is writable");
    path
}

/// Sends the target's request once through a gRPC client that checks
/// grpc-status, and returns the response body's length (h2load's byte count
/// is checked against it after every run).
async fn check_call(target: &Target) -> Vec<u8> {
    let channel = support::connect(&target.addr, Duration::from_secs(5)).await;
    let secret = target.authorized.then_some(support::EVAL_SECRET);
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let body = grpc_raw::call_raw(channel.clone(), target.path, target.body.clone(), secret)
            .await
            .unwrap_or_else(|status| panic!("{} answered {status}", target.name));
        bodies.push(body);
    }
    let lengths: Vec<usize> = bodies.iter().map(Vec::len).collect();
    assert!(
        lengths.windows(2).all(|w| w[0] == w[1]),
        "{}: response sizes vary: {lengths:?}",
        target.name
    );
    bodies.swap_remove(0)
}

/// Decodes a real answer and checks it is what the benchmark claims to
/// measure: the echo returns its input, the constrained flag is served by its
/// split, and every flag of the namespace is evaluated without error.
fn check_answer(target: &Target, body: &[u8], flag_count: usize) {
    match target.name {
        "echo" => assert_eq!(
            body,
            target.body.as_slice(),
            "the echo server changed the message"
        ),
        "Evaluate" => {
            let answer = pb::EvaluateResponse::decode(body).expect("an EvaluateResponse");
            assert_eq!(
                answer.reason,
                pb::Reason::Split as i32,
                "Evaluate answered {answer:?}"
            );
        }
        _ => {
            let answer = pb::EvaluateBatchResponse::decode(body).expect("an EvaluateBatchResponse");
            assert_eq!(
                answer.results.len(),
                flag_count,
                "EvaluateAll answered {} results",
                answer.results.len()
            );
            let failed: Vec<&pb::EvaluateResponse> = answer
                .results
                .iter()
                .filter(|r| r.reason == pb::Reason::Error as i32)
                .collect();
            assert!(failed.is_empty(), "EvaluateAll had errors: {failed:?}");
        }
    }
}

/// Finds a user inside the constrained flag's 50% rollout, so every measured
/// `Evaluate` goes through the constraints, the rollout hash and the split.
async fn rollout_context(addr: &str, revision: u64) -> pb::Context {
    let mut client = support::eval_client(support::connect(addr, Duration::from_secs(5)).await);
    for index in 0..100 {
        let mut context = fixtures::context();
        context.user_id = format!("user-{index}");
        context.targeting_key = context.user_id.clone();
        let answer = client
            .evaluate(pb::EvaluateRequest {
                namespace: NAMESPACE.to_string(),
                flag_key: CONSTRAINED_FLAG.to_string(),
                context: Some(context.clone()),
                expected_type: 0,
                min_revision: revision,
            })
            .await
            .unwrap_or_else(|status| panic!("Evaluate failed: {status}"))
            .into_inner();
        if answer.reason == pb::Reason::Split as i32 {
            return context;
        }
    }
    panic!(
        "no user of 100 fell inside the 50% rollout of {CONSTRAINED_FLAG}: the rule does not match the context"
    );
}

fn report(layout: Layout, targets: &[Target], flag_count: usize) {
    if targets.len() < 3 {
        return;
    }
    let echo = median(&targets[0].max_rps);
    println!();
    println!(
        "| load (layout {layout:?}) | req/s (median) | runs | vs echo | server CPU per request | at 70% of max: req/s, p50 / p99 (runs) | p99.9 |"
    );
    println!("|---|---:|---|---:|---:|---|---|");
    for target in targets {
        let max = median(&target.max_rps);
        let (at, tail) = latency_cells(&target.paced);
        let name = if target.name == "EvaluateAll" {
            format!("EvaluateAll ({flag_count} flags)")
        } else {
            target.name.to_string()
        };
        println!(
            "| {name} | {max:.0} | {} | {:.0}% | {:.1} us | {at} | {tail} |",
            runs(&target.max_rps, 0),
            100.0 * max / echo,
            median(&target.cpu_us),
        );
    }
    if targets.iter().any(|t| t.open_max.is_some()) {
        println!();
        println!(
            "| load (layout {layout:?}) | open-loop max req/s | vs h2load's | at 70% of it: req/s, p50 / p99 (runs) | p99.9 |"
        );
        println!("|---|---:|---:|---|---|");
        for target in targets {
            let Some(open) = target.open_max else {
                continue;
            };
            let (at, tail) = latency_cells(&target.paced_open);
            println!(
                "| {} | {:.0}{} | {:.0}% | {at} | {tail} |",
                target.name,
                open.rate,
                if open.may_be_higher { " (or more)" } else { "" },
                100.0 * open.rate / median(&target.max_rps),
            );
        }
    }
    let evaluate = median(&targets[1].max_rps);
    let all = median(&targets[2].max_rps);
    let worst = |runs: fn(&Target) -> &Vec<LatencyRun>| {
        let p99 = targets
            .iter()
            .map(|t| median_p99(runs(t)))
            .fold(0.0, f64::max);
        let measured = targets.iter().all(|t| !runs(t).is_empty());
        (p99, measured)
    };
    println!();
    match layout {
        Layout::Shared => {
            let (p99, _) = worst(|t| &t.paced);
            println!(
                "targets (shared): Evaluate/echo {:.0}% (>= 85%: {}), EvaluateAll {all:.0} req/s (>= 10,000: {}); h2load --rps at 70%: worst median p99 {p99:.2} ms, set mostly by h2load's 10 ms bursts (the latency target is read in the pinned layout)",
                100.0 * evaluate / echo,
                verdict(evaluate / echo >= 0.85),
                verdict(all >= 10_000.0),
            );
        }
        Layout::Pinned => {
            let (open, measured) = worst(|t| &t.paced_open);
            let (of_h2load, _) = worst(|t| &t.paced);
            println!(
                "targets (pinned): worst median p99 at 70% of the open-loop maximum {open:.2} ms (<= 5 ms: {}); at 70% of h2load's maximum, for comparison, {of_h2load:.2} ms; the throughput targets are read in the shared layout",
                if measured {
                    verdict(open <= 5.0)
                } else {
                    "not measured"
                },
            );
        }
    }
}

/// A report's latency cells for one series of runs: `rate: p50 / p99 ms
/// (runs: …)` with medians, and the p99.9 (`-` when the runs have none).
fn latency_cells(series: &[LatencyRun]) -> (String, String) {
    let p50: Vec<f64> = series.iter().map(|p| p.p50).collect();
    let p99: Vec<f64> = series.iter().map(|p| p.p99).collect();
    let p999: Vec<f64> = series.iter().filter_map(|p| p.p999).collect();
    let at = format!(
        "{:.0}: {:.2} / {:.2} ms (runs: {})",
        series.first().map_or(0.0, |p| p.rate),
        median(&p50),
        median_p99(series),
        runs(&p99, 2)
    );
    let tail = if p999.is_empty() {
        "-".to_string()
    } else {
        format!("{:.2} ms (runs: {})", median(&p999), runs(&p999, 2))
    };
    (at, tail)
}

fn median_p99(series: &[LatencyRun]) -> f64 {
    median(&series.iter().map(|p| p.p99).collect::<Vec<_>>())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}
