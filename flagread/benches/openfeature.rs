//! The OpenFeature front ends against FlagEval, in one run with one load generator: flagd's
//! `ResolveBoolean` (v2) next to `FlagEval.Evaluate` on the same flag and context, v1's
//! `ResolveAll` next to `EvaluateAll` on the same 350-flag namespace, and OFREP's single-flag
//! and bulk endpoints (HTTP/1.1 JSON) next to them.
//!
//! One flagwrite and one flagread process; by default the replica runs alone on CPU 0 with one
//! async worker (as on a one-CPU pod) and h2load and the writer on CPU 1, so each target's
//! maximum is the replica's, not the load generator's (`BENCH_LAYOUT=shared` leaves everything
//! on both CPUs). h2load (1 thread, `BENCH_CLIENTS` connections; gRPC with `BENCH_STREAMS`
//! streams each, HTTP/1.1 one request at a time per connection) runs each target as fast as it
//! goes for `BENCH_SECONDS` after a 1 s warm-up; the targets take turns for `BENCH_ROUNDS`
//! rounds and the table gives the medians, the ratios the targets are read from, and
//! the replica's CPU time per request.
//!
//! The flag is `flag-00001` of the fixtures: a boolean flag with a constraint and a 25% rollout,
//! evaluated for a user the rollout lets through, so every call goes through the constraint and
//! the rollout hash and is served by the rule. Each target's answer is checked once before it
//! is measured.
//!
//! Run it with `scripts/bench-openfeature.sh`, or `cargo bench -p flagread --bench openfeature`
//! once both binaries are built in the bench profile. Knobs (environment): `BENCH_ROUNDS`
//! (default 3), `BENCH_SECONDS` (default 5), `BENCH_CLIENTS` (default 16), `BENCH_STREAMS`
//! (default 16), `BENCH_FLAGS` (default 350), `BENCH_LAYOUT` (`pinned` or `shared`),
//! `BENCH_ONLY` (comma-separated target names).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flagstream::pb;
use flagstream::pb::flagd::{v1, v2};
use prost::Message;
use support::fixtures::{self, NAMESPACE};
use support::h2load::{self, Load, Pacing};
use support::proc::{self, Proc, RunDir};
use support::stats::{median, runs};

/// The flag every single-flag target evaluates: constraint `country IN (de, fr)` and a 25%
/// rollout, boolean.
const FLAG: &str = "flag-00001";

/// In the pinned layout: the replica's CPU, and everyone else's.
const SERVER_CPU: usize = 0;
const LOAD_CPU: usize = 1;

/// One thing h2load is pointed at.
struct Target {
    name: &'static str,
    /// The target its ratio is taken against, if any.
    versus: Option<&'static str>,
    protocol: Protocol,
    /// Request path.
    path: String,
    /// Request body (a protobuf message for gRPC, JSON for OFREP).
    body: Vec<u8>,
    /// Requests per second, one per round.
    rps: Vec<f64>,
    /// Replica CPU microseconds per request, one per round.
    cpu_us: Vec<f64>,
}

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Grpc,
    Ofrep,
}

fn main() {
    if !support::started_by_cargo_bench("openfeature") {
        return;
    }
    proc::watchdog(Duration::from_secs(15 * 60));
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    runtime.block_on(run());
}

async fn run() {
    h2load::require();
    let rounds: usize = support::env_or("BENCH_ROUNDS", 3);
    let seconds: u32 = support::env_or("BENCH_SECONDS", 5);
    let clients: u32 = support::env_or("BENCH_CLIENTS", 16);
    let streams: u32 = support::env_or("BENCH_STREAMS", 16);
    let flag_count: usize = support::env_or("BENCH_FLAGS", 350);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let pinned = support::env_or("BENCH_LAYOUT", "pinned".to_string()) != "shared" && cpus >= 2;

    let dir = RunDir::new("openfeature");
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
    if pinned {
        // This process (so every h2load it starts) and the writer move to the load CPU.
        support::paced::pin(&std::process::id().to_string(), LOAD_CPU, true);
        support::paced::pin(&writer.proc.pid().to_string(), LOAD_CPU, true);
    }
    let server_cpu = pinned.then_some(SERVER_CPU);
    let mut replica =
        support::spawn_replica_on(dir.path(), &tokens, &writer.addr, "flagread", server_cpu);
    support::wait_serving(
        &replica.addr,
        Duration::from_secs(30),
        Duration::from_millis(10),
    )
    .await;
    // Serving means holding a state; wait for the fixtures' revision.
    let mut eval =
        support::eval_client(support::connect(&replica.addr, Duration::from_secs(5)).await);
    eval.evaluate(pb::EvaluateRequest {
        namespace: NAMESPACE.into(),
        flag_key: FLAG.into(),
        min_revision: revision,
        ..Default::default()
    })
    .await
    .expect("the replica reaches the fixtures' revision");

    // A user inside the flag's 25% rollout, so every call goes through the constraint and the
    // rollout hash and is served by the rule.
    let mut context = fixtures::context();
    for index in 0.. {
        assert!(index < 200, "no user among 200 is inside the rollout");
        context.user_id = format!("user-{index}");
        context.targeting_key = context.user_id.clone();
        let answer = eval
            .evaluate(pb::EvaluateRequest {
                namespace: NAMESPACE.into(),
                flag_key: FLAG.into(),
                context: Some(context.clone()),
                ..Default::default()
            })
            .await
            .expect("Evaluate answers")
            .into_inner();
        if answer.reason == pb::Reason::TargetingMatch as i32 {
            break;
        }
    }
    let mut targets = targets(&context);
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        let names: Vec<&str> = only.split(',').map(str::trim).collect();
        targets.retain(|t| names.contains(&t.name));
        assert!(!targets.is_empty(), "BENCH_ONLY={only:?} names no target");
    }
    for target in &targets {
        check(target, &replica, flag_count).await;
    }

    println!(
        "layout {}: h2load 1 thread, {clients} connections (gRPC: {streams} streams each; HTTP/1.1: one request at a time each), {seconds} s after a 1 s warm-up, {rounds} rounds",
        if pinned {
            "pinned: flagread alone on CPU 0 (one worker), h2load and flagwrite on CPU 1"
        } else {
            "shared: everything on every CPU"
        }
    );
    for round in 0..rounds {
        for target in &mut targets {
            let addr = match target.protocol {
                Protocol::Grpc => &replica.addr,
                Protocol::Ofrep => &replica.ofrep_addr,
            };
            drive(target, addr, dir.path(), clients, streams, 1);
            let before = support::cpu_seconds(replica.proc.pid());
            let (rps, done) = drive(target, addr, dir.path(), clients, streams, seconds);
            let cpu = support::cpu_seconds(replica.proc.pid()) - before;
            let cpu_us = cpu * 1e6 / done as f64;
            println!(
                "round {}: {:<16} {rps:>9.0} req/s, replica CPU {cpu_us:.1} us/request",
                round + 1,
                target.name
            );
            target.rps.push(rps);
            target.cpu_us.push(cpu_us);
        }
        replica.proc.assert_alive();
    }
    report(&targets, flag_count);
}

/// The targets, each after the one it is compared with, all with `context`.
fn targets(context: &pb::Context) -> Vec<Target> {
    let grpc = |name, versus, path: &str, body: Vec<u8>| Target {
        name,
        versus,
        protocol: Protocol::Grpc,
        path: path.to_string(),
        body,
        rps: Vec::new(),
        cpu_us: Vec::new(),
    };
    let ofrep = |name, versus, path: String| Target {
        name,
        versus,
        protocol: Protocol::Ofrep,
        path,
        body: serde_json::to_vec(&serde_json::json!({ "context": json_context(context) }))
            .expect("a JSON body"),
        rps: Vec::new(),
        cpu_us: Vec::new(),
    };
    vec![
        grpc(
            "Evaluate",
            None,
            "/flagstream.v1.FlagEval/Evaluate",
            pb::EvaluateRequest {
                namespace: NAMESPACE.into(),
                flag_key: FLAG.into(),
                context: Some(context.clone()),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        grpc(
            "ResolveBoolean",
            Some("Evaluate"),
            "/flagd.evaluation.v2.Service/ResolveBoolean",
            v2::ResolveBooleanRequest {
                flag_key: FLAG.into(),
                context: Some(struct_context(context)),
            }
            .encode_to_vec(),
        ),
        ofrep(
            "OFREP single",
            Some("Evaluate"),
            format!("/ofrep/v1/evaluate/flags/{FLAG}"),
        ),
        grpc(
            "EvaluateAll",
            None,
            "/flagstream.v1.FlagEval/EvaluateAll",
            pb::EvaluateAllRequest {
                namespace: NAMESPACE.into(),
                context: Some(context.clone()),
                min_revision: 0,
            }
            .encode_to_vec(),
        ),
        grpc(
            "ResolveAll (v1)",
            Some("EvaluateAll"),
            "/flagd.evaluation.v1.Service/ResolveAll",
            v1::ResolveAllRequest {
                context: Some(struct_context(context)),
            }
            .encode_to_vec(),
        ),
        ofrep(
            "OFREP bulk",
            Some("EvaluateAll"),
            "/ofrep/v1/evaluate/flags".to_string(),
        ),
    ]
}

/// `context` as OpenFeature SDKs send it.
fn json_context(context: &pb::Context) -> serde_json::Value {
    let context = context.clone();
    let mut object = serde_json::json!({
        "targetingKey": context.targeting_key,
        "userId": context.user_id,
        "remoteAddress": context.remote_address,
        "environment": context.environment,
        "appName": context.app_name,
    });
    for (key, value) in context.properties {
        // Numbers travel as numbers, as an SDK sends an attribute set to one.
        object[key] = match value.parse::<f64>() {
            Ok(n) => serde_json::json!(n),
            Err(_) => serde_json::json!(value),
        };
    }
    object
}

/// [`json_context`] as a `google.protobuf.Struct` (flagd's providers send one).
fn struct_context(context: &pb::Context) -> prost_types::Struct {
    let serde_json::Value::Object(map) = json_context(context) else {
        unreachable!("the context is an object")
    };
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), flagstream::convert::json_ref_to_pb(v)))
            .collect(),
    }
}

/// Runs h2load against `target` for `seconds`; returns requests/s and requests done. Panics
/// unless every request succeeded.
fn drive(
    target: &Target,
    addr: &str,
    dir: &Path,
    clients: u32,
    streams: u32,
    seconds: u32,
) -> (f64, u64) {
    let body = dir.join(format!(
        "{}.body",
        target.name.replace([' ', '(', ')'], "_")
    ));
    let authorization = format!("authorization: Bearer {}", support::EVAL_SECRET);
    let outcome = match target.protocol {
        Protocol::Grpc => {
            std::fs::write(&body, support::grpc_raw::frame(&target.body))
                .expect("the run directory is writable");
            let load = Load {
                url: format!("http://{addr}{}", target.path),
                frame: &body,
                headers: vec![authorization],
                clients,
                streams,
                seconds,
                pacing: Pacing::Max,
                log_file: None,
            };
            load.run(dir, "h2load")
        }
        Protocol::Ofrep => {
            std::fs::write(&body, &target.body).expect("the run directory is writable");
            let mut command = Command::new(h2load::h2load_path());
            command
                .arg("--h1")
                .arg(format!("--clients={clients}"))
                .arg("--threads=1")
                .arg(format!("--data={}", body.display()))
                .arg("--header=content-type: application/json")
                .arg(format!("--header={authorization}"))
                .arg(format!("--duration={seconds}"))
                .arg(format!("http://{addr}{}", target.path));
            let mut process = Proc::spawn("h2load-h1", command, dir);
            let status = process.wait(Duration::from_secs(u64::from(seconds) + 30));
            let summary = std::fs::read_to_string(&process.log).unwrap_or_default();
            assert!(status.success(), "h2load failed ({status}):\n{summary}");
            h2load::parse(&summary)
        }
    };
    assert!(
        outcome.succeeded > 0
            && outcome.failed == 0
            && outcome.errored == 0
            && outcome.timeout == 0,
        "{}: h2load saw failures:\n{}",
        target.name,
        outcome.summary
    );
    if target.protocol == Protocol::Grpc {
        // Every gRPC call answered OK with one whole message (the byte count says so).
        let len = grpc_answer_len(target);
        outcome.check(target.name, len);
    }
    (outcome.req_per_s, outcome.done)
}

/// The length of the answer each gRPC target gets (all calls of a target are equal).
fn grpc_answer_len(target: &Target) -> usize {
    ANSWER_LENS.with(|lens| {
        *lens
            .borrow()
            .get(target.name)
            .unwrap_or_else(|| panic!("{} was not checked", target.name))
    })
}

thread_local! {
    /// Each gRPC target's answer length, recorded by [`check`].
    static ANSWER_LENS: std::cell::RefCell<std::collections::HashMap<&'static str, usize>> =
        Default::default();
}

/// Calls `target` once and checks the answer is what the benchmark claims to measure.
async fn check(target: &Target, replica: &support::Replica, flag_count: usize) {
    match target.protocol {
        Protocol::Grpc => {
            let channel = support::connect(&replica.addr, Duration::from_secs(5)).await;
            let body = support::grpc_raw::call_raw(
                channel,
                &target.path,
                target.body.clone(),
                Some(support::EVAL_SECRET),
            )
            .await
            .unwrap_or_else(|status| panic!("{} answered {status}", target.name));
            match target.name {
                "Evaluate" => {
                    let answer = pb::EvaluateResponse::decode(&body[..]).expect("a response");
                    assert_eq!(
                        answer.reason,
                        pb::Reason::TargetingMatch as i32,
                        "{answer:?}"
                    );
                }
                "ResolveBoolean" => {
                    let answer = v2::ResolveBooleanResponse::decode(&body[..]).expect("a response");
                    assert_eq!(answer.reason, "TARGETING_MATCH", "{answer:?}");
                }
                "EvaluateAll" => {
                    let answer = pb::EvaluateBatchResponse::decode(&body[..]).expect("a response");
                    assert_eq!(answer.results.len(), flag_count);
                }
                _ => {
                    let answer = v1::ResolveAllResponse::decode(&body[..]).expect("a response");
                    assert_eq!(answer.flags.len(), flag_count);
                }
            }
            ANSWER_LENS.with(|lens| lens.borrow_mut().insert(target.name, body.len()));
        }
        Protocol::Ofrep => {
            let (status, body) = ofrep_post(&replica.ofrep_addr, &target.path, &target.body).await;
            assert_eq!(status, 200, "{}: {body}", target.name);
            let answer: serde_json::Value = serde_json::from_str(&body).expect("a JSON answer");
            if target.name == "OFREP single" {
                assert_eq!(answer["reason"], "TARGETING_MATCH", "{answer}");
            } else {
                assert_eq!(
                    answer["flags"].as_array().map(Vec::len),
                    Some(flag_count),
                    "{body}"
                );
            }
        }
    }
}

/// One HTTP/1.1 POST with `Connection: close`: status and body.
async fn ofrep_post(addr: &str, path: &str, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("OFREP at {addr}: {e}"));
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        support::EVAL_SECRET,
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    socket.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn report(targets: &[Target], flag_count: usize) {
    let rate = |name: &str| {
        targets
            .iter()
            .find(|t| t.name == name)
            .map(|t| median(&t.rps))
    };
    println!();
    println!("| target | req/s (median) | runs | vs | replica CPU per request |");
    println!("|---|---:|---|---:|---:|");
    for target in targets {
        let rps = median(&target.rps);
        let versus = match target.versus.and_then(|v| rate(v).map(|r| (v, r))) {
            Some((name, base)) => format!("{:.0}% of {name}", 100.0 * rps / base),
            None => String::new(),
        };
        println!(
            "| {} | {rps:.0} | {} | {versus} | {:.1} us |",
            target.name,
            runs(&target.rps, 0),
            median(&target.cpu_us)
        );
    }
    println!();
    println!("(EvaluateAll, ResolveAll and OFREP bulk evaluate all {flag_count} flags.)");
    if let (Some(resolve), Some(evaluate)) = (rate("ResolveBoolean"), rate("Evaluate")) {
        let ratio = 100.0 * resolve / evaluate;
        println!(
            "target: ResolveBoolean >= 90% of Evaluate's requests/s: {ratio:.0}% ({})",
            if ratio >= 90.0 { "met" } else { "NOT met" }
        );
    }
}
