//! Clients that know flagread only from `proto/` or from reflection: a Python client generated
//! by grpcio-tools calls Evaluate, EvaluateAll and Watch; grpcurl lists the services and calls
//! Evaluate through reflection. The tools come from `scripts/test.sh` (FLAGSTREAM_PYTHON,
//! FLAGSTREAM_GRPCURL); without them the tests say so and pass, unless `CI` is set.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use flagread::Config;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The tool named by `var` (or `fallback` on PATH) if `probe` runs successfully with it.
fn tool(var: &str, fallback: &str, probe: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(fallback));
    let ok = std::process::Command::new(&path)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{var} ({}) is required in CI; run scripts/test.sh",
        path.display()
    );
    eprintln!(
        "NOTICE: skipping: {} not usable; run scripts/test.sh to install it",
        path.display()
    );
    None
}

/// A replica in this process following a fake writer that sent a snapshot at revision 5.
async fn replica(
    fake: &mut FakeUpstream,
) -> (
    std::net::SocketAddr,
    Subscription,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(flagread::run(
        listener,
        Config::local(fake.url.clone()),
        async {
            let _ = stopped.await;
        },
    ));
    let sub = fake.next().await;
    sub.send(snapshot(
        5,
        vec![flag("prod", "a", 2), flag("prod", "b", 5)],
    ))
    .await;
    // Wait for SERVING through the public API: an Evaluate that succeeds.
    let url = format!("http://{addr}");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(mut client) =
            flagstream::pb::flag_eval_client::FlagEvalClient::connect(url.clone()).await
        {
            let request = flagstream::pb::EvaluateRequest {
                namespace: "prod".into(),
                flag_key: "a".into(),
                ..Default::default()
            };
            if client.evaluate(request).await.is_ok() {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready, "the replica serves the snapshot");
    (addr, sub, stop)
}

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto")
}

#[tokio::test]
async fn a_python_client_generated_from_the_protos_evaluates_and_watches() {
    let Some(python) = tool(
        "FLAGSTREAM_PYTHON",
        "python3",
        &["-c", "import grpc_tools, grpc"],
    ) else {
        return;
    };
    let out = std::env::temp_dir().join(format!(
        "flagread-py-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&out).unwrap();
    let protos: Vec<PathBuf> = ["types.proto", "eval.proto"]
        .iter()
        .map(|f| proto_dir().join("flagstream/v1").join(f))
        .collect();
    let status = std::process::Command::new(&python)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto_dir().display()))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .args(&protos)
        .status()
        .unwrap();
    assert!(status.success(), "grpcio-tools generates the client");

    let mut fake = FakeUpstream::start().await;
    let (addr, sub, _stop) = replica(&mut fake).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/client.py");
    let mut child = tokio::process::Command::new(&python)
        .arg(script)
        .arg(&out)
        .arg(addr.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the client answers within 30 s")
            .unwrap()
            .expect("the client printed a line")
    };
    assert_eq!(next().await, "EVALUATE a on True REASON_STATIC 5");
    assert_eq!(next().await, "MISSING NOT_FOUND");
    assert_eq!(next().await, "ALL a=on b=on");
    assert_eq!(next().await, "WATCHING 5");
    sub.send([put(6, vec![flag("prod", "c", 6)])]).await;
    assert_eq!(next().await, "CHANGED 6 c c=on");
    assert!(child.wait().await.unwrap().success());
    std::fs::remove_dir_all(out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_evaluates_through_reflection() {
    let Some(grpcurl) = tool("FLAGSTREAM_GRPCURL", "grpcurl", &["-version"]) else {
        return;
    };
    let mut fake = FakeUpstream::start().await;
    let (addr, _sub, _stop) = replica(&mut fake).await;
    let run = |args: &[&str]| {
        let output = std::process::Command::new(&grpcurl)
            .arg("-plaintext")
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "grpcurl {args:?}: {text}");
        text
    };
    let addr = addr.to_string();
    let services = tokio::task::block_in_place(|| run(&[&addr, "list"]));
    for service in [
        "flagstream.v1.FlagEval",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.contains(service),
            "{service} missing from {services}"
        );
    }
    let request = r#"{"namespace": "prod", "flag_key": "a", "context": {"user_id": "u1"}}"#;
    let answer = tokio::task::block_in_place(|| {
        run(&["-d", request, &addr, "flagstream.v1.FlagEval/Evaluate"])
    });
    let json: serde_json::Value =
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(json["variant"], "on", "{answer}");
    assert_eq!(json["value"]["boolValue"], true, "{answer}");
    assert_eq!(json["reason"], "REASON_STATIC", "{answer}");
    assert_eq!(json["revision"], "5", "{answer}");
}
