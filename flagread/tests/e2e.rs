//! End to end with the real binaries on 127.0.0.1: one flagwrite and three flagread processes,
//! with tokens. A write is visible on every replica and readable with `min_revision`; replicas
//! keep answering while the writer is killed, and resume without a new snapshot when it
//! returns; a killed replica syncs again and turns SERVING; a replica starts from its snapshot
//! file while the writer is down.

mod cluster;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cluster::{flagwrite_bin, free_port};
use flagstream::pb;
use flagstream::pb::flag_admin_client::FlagAdminClient;
use flagstream::pb::flag_eval_client::FlagEvalClient;
use support::flag;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const TOKENS: &str = "\
ops      admin  ops-secret-0123456789
replica  sync   replica-secret-0123456789
web      eval   web-secret-0123456789
";
const ADMIN: &str = "ops-secret-0123456789";
const EVAL: &str = "web-secret-0123456789";

/// A child process, killed (SIGKILL) when dropped so a failing test leaves nothing behind.
struct Proc {
    name: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Kills the process at once, as a crash would.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and expects a clean exit within 15 s.
    fn terminate(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not drain within 15 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn spawn(name: &str, bin: &Path, args: &[String], log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    Proc {
        name: name.to_string(),
        child,
    }
}

struct Cluster {
    dir: PathBuf,
    writer_port: u16,
}

impl Cluster {
    fn writer(&self) -> Proc {
        let args = [
            "--listen".to_string(),
            format!("127.0.0.1:{}", self.writer_port),
            "--data-dir".into(),
            self.dir.join("data").display().to_string(),
            "--tokens-file".into(),
            self.dir.join("tokens").display().to_string(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--heartbeat-ms".into(),
            "200".into(),
        ];
        spawn(
            "flagwrite",
            flagwrite_bin(),
            &args,
            &self.dir.join("flagwrite.log"),
        )
    }

    /// A replica on `port`, keeping its state in `snapshot`; its metrics on `metrics`.
    fn replica(&self, name: &str, port: u16, metrics: u16, snapshot: &Path) -> Proc {
        let args = [
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--upstream".into(),
            format!("http://127.0.0.1:{}", self.writer_port),
            "--sync-token".into(),
            "replica-secret-0123456789".into(),
            "--tokens-file".into(),
            self.dir.join("tokens").display().to_string(),
            "--snapshot-file".into(),
            snapshot.display().to_string(),
            "--snapshot-interval-ms".into(),
            "50".into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
            "--ofrep-listen".into(),
            "127.0.0.1:0".into(),
            "--backoff-min-ms".into(),
            "20".into(),
            "--backoff-max-ms".into(),
            "300".into(),
            "--upstream-silence-s".into(),
            "2".into(),
        ];
        spawn(
            name,
            Path::new(env!("CARGO_BIN_EXE_flagread")),
            &args,
            &self.dir.join(format!("{name}.log")),
        )
    }
}

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request.set_timeout(Duration::from_secs(5));
    request
}

async fn channel(port: u16) -> Channel {
    for _ in 0..500 {
        if let Ok(channel) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing listens on port {port}");
}

/// Waits until the service on `port` reports SERVING for `service` (20 s at most).
async fn serving(port: u16, service: &str) {
    let mut health = HealthClient::new(channel(port).await);
    for _ in 0..1000 {
        let request = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        if let Ok(response) = health.check(request).await
            && response.into_inner().status == ServingStatus::Serving as i32
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("port {port} never became SERVING");
}

async fn evaluate(
    port: u16,
    key: &str,
    min_revision: u64,
) -> Result<pb::EvaluateResponse, tonic::Status> {
    let mut client = FlagEvalClient::new(channel(port).await);
    let request = pb::EvaluateRequest {
        namespace: "demo".into(),
        flag_key: key.into(),
        min_revision,
        ..Default::default()
    };
    client
        .evaluate(authed(request, EVAL))
        .await
        .map(|r| r.into_inner())
}

/// The value of one metric line of the replica whose metrics are on `port`.
async fn metric(port: u16, name: &str) -> i64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    socket.read_to_string(&mut text).await.unwrap();
    let prefix = format!("{name} ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"));
    line[prefix.len()..].trim().parse().unwrap()
}

async fn set_enabled(admin: &mut FlagAdminClient<Channel>, enabled: bool) -> u64 {
    let request = pb::SetFlagEnabledRequest {
        namespace: "demo".into(),
        key: "checkout".into(),
        enabled,
        ..Default::default()
    };
    admin
        .set_flag_enabled(authed(request, ADMIN))
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// Checks every replica answers `checkout` with `variant` at `revision` or later, asking with
/// `min_revision` (read your own write).
async fn check(ports: &[u16], revision: u64, variant: &str) {
    for port in ports {
        let response = evaluate(*port, "checkout", revision)
            .await
            .unwrap_or_else(|s| panic!("replica on {port}: {s:?}"));
        assert_eq!(response.variant, variant, "replica on {port}");
        assert!(response.revision >= revision, "replica on {port}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writer_three_replicas_survive_restarts() {
    let dir = std::env::temp_dir().join(format!(
        "flagread-e2e-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokens"), TOKENS).unwrap();
    let cluster = Cluster {
        dir: dir.clone(),
        writer_port: free_port(),
    };
    let writer = cluster.writer();
    serving(cluster.writer_port, "").await;
    let mut admin = FlagAdminClient::new(channel(cluster.writer_port).await);
    let namespace = pb::Namespace {
        key: "demo".into(),
        ..Default::default()
    };
    admin
        .create_namespace(authed(
            pb::CreateNamespaceRequest {
                namespace: Some(namespace),
                options: None,
            },
            ADMIN,
        ))
        .await
        .unwrap();
    let mut checkout = pb::Flag::from(flag("demo", "checkout", 0));
    checkout.stamp = None;
    let created = admin
        .create_flag(authed(
            pb::CreateFlagRequest {
                flag: Some(checkout),
                options: None,
            },
            ADMIN,
        ))
        .await
        .unwrap();
    let created = created.into_inner().revision;

    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let metrics: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let snapshot = |i: usize| dir.join(format!("replica-{i}.pb"));
    let mut replicas: Vec<Option<Proc>> = (0..3)
        .map(|i| Some(cluster.replica(&format!("replica-{i}"), ports[i], metrics[i], &snapshot(i))))
        .collect();
    for port in &ports {
        serving(*port, "flagstream.v1.FlagEval").await;
    }
    check(&ports, created, "on").await;

    // A write is visible on every replica, and readable at once with its revision.
    let off = set_enabled(&mut admin, false).await;
    check(&ports, off, "off").await;

    // The writer dies: replicas keep answering from memory.
    writer.kill();
    for port in &ports {
        let response = evaluate(*port, "checkout", 0).await.unwrap();
        assert_eq!((response.variant.as_str(), response.revision), ("off", off));
    }
    for port in &metrics {
        support::eventually_async("the replica notices", || async {
            metric(*port, "flagread_connected").await == 0
        })
        .await;
    }

    // It comes back: replicas resume from their revision, without a new snapshot.
    let writer = cluster.writer();
    serving(cluster.writer_port, "").await;
    let mut admin = FlagAdminClient::new(channel(cluster.writer_port).await);
    let on = set_enabled(&mut admin, true).await;
    check(&ports, on, "on").await;
    for port in &metrics {
        assert_eq!(
            metric(*port, "flagread_snapshots_applied_total").await,
            1,
            "resumed without a snapshot"
        );
        assert!(metric(*port, "flagread_subscriptions_total").await >= 2);
        assert_eq!(metric(*port, "flagread_applied_revision").await, on as i64);
    }

    // A replica is killed and started again with no state: it syncs and turns SERVING.
    replicas[1].take().unwrap().kill();
    let fresh = dir.join("replica-1-fresh.pb");
    replicas[1] = Some(cluster.replica("replica-1-again", ports[1], metrics[1], &fresh));
    serving(ports[1], "flagstream.v1.FlagEval").await;
    check(&ports, on, "on").await;

    // With the writer down, a new replica starts from a snapshot file and serves.
    support::eventually_async("replica 0 saves revision {on}", || async {
        flagread::wire::read_snapshot_file(&snapshot(0))
            .ok()
            .flatten()
            .is_some_and(|s| s.revision == on)
    })
    .await;
    writer.kill();
    let copy = dir.join("replica-3.pb");
    std::fs::copy(snapshot(0), &copy).unwrap();
    let (port3, metrics3) = (free_port(), free_port());
    let late = cluster.replica("replica-3", port3, metrics3, &copy);
    serving(port3, "flagstream.v1.FlagEval").await;
    let response = evaluate(port3, "checkout", 0).await.unwrap();
    assert_eq!((response.variant.as_str(), response.revision), ("on", on));
    assert_eq!(metric(metrics3, "flagread_connected").await, 0);

    // SIGTERM drains and exits cleanly, writer or not.
    late.terminate();
    for replica in replicas.iter_mut() {
        replica.take().unwrap().terminate();
    }
    std::fs::remove_dir_all(dir).unwrap();
}
