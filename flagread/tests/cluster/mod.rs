//! Real processes for the fault suite: a flagwrite and flagread replicas on 127.0.0.1 with
//! tokens of every scope, killed when dropped; their gRPC and metrics clients; and the
//! convergence check ([`converged`]) every fault test ends with.
#![allow(dead_code)]

pub mod proxy;
pub mod raw;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use flagstream::pb;
use flagstream::pb::flag_admin_client::FlagAdminClient;
use flagstream::pb::flag_eval_client::FlagEvalClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// One token per scope the services know, plus an eval token limited to namespace `demo`.
pub const TOKENS: &str = "\
ops      admin       ops-secret-0123456789
viewer   admin-read  viewer-secret-0123456789
replica  sync        replica-secret-0123456789
web      eval        web-secret-0123456789
demo-web eval:demo   demo-web-secret-0123456789
";
pub const ADMIN: &str = "ops-secret-0123456789";
pub const ADMIN_READ: &str = "viewer-secret-0123456789";
pub const SYNC: &str = "replica-secret-0123456789";
pub const EVAL: &str = "web-secret-0123456789";
pub const EVAL_DEMO: &str = "demo-web-secret-0123456789";

/// The writer's heartbeat interval in the suite, in milliseconds.
pub const HEARTBEAT_MS: u64 = 200;

/// A child process, killed (SIGKILL) when dropped so a failing test leaves nothing behind.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

/// A scratch directory for one test, removed when dropped.
pub struct Dir(pub PathBuf);

/// A flagwrite on a fixed loopback port over a data directory that outlives the process, so
/// that it can be killed, restarted, backed up and restored.
pub struct Writer {
    /// The port it listens on, the same across restarts.
    pub port: u16,
    /// Its data directory.
    pub data: PathBuf,
    /// The test's directory (tokens file, logs).
    dir: PathBuf,
    /// The running process, if any.
    proc: Option<Proc>,
    /// Starts so far, to name the log files.
    starts: u32,
}

/// How a replica is started.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    /// `--namespaces`; empty follows all.
    pub namespaces: Vec<String>,
    /// `--upstream-silence-s`.
    pub silence_s: u64,
    /// `--backoff-min-ms`.
    pub backoff_min_ms: u64,
    /// `--backoff-max-ms`.
    pub backoff_max_ms: u64,
    /// Keep a snapshot file (in the test's directory).
    pub snapshot_file: bool,
}

/// A flagread process.
pub struct Replica {
    pub name: String,
    /// FlagEval port.
    pub port: u16,
    /// `/metrics` port.
    pub metrics: u16,
    /// The namespaces it follows (empty: all).
    pub namespaces: Vec<String>,
    /// How it was started, to start it again.
    options: ReplicaOptions,
    /// Its upstream URL (the writer or a proxy in front of it).
    upstream: String,
    dir: PathBuf,
    proc: Option<Proc>,
    starts: u32,
}

impl Default for ReplicaOptions {
    fn default() -> ReplicaOptions {
        ReplicaOptions {
            namespaces: Vec::new(),
            silence_s: 1,
            backoff_min_ms: 20,
            backoff_max_ms: 500,
            snapshot_file: false,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Kills the process at once (SIGKILL), as a crash or power cut would.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and expects a clean exit within 15 s.
    pub fn terminate(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not drain within 15 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Dir {
    /// A fresh directory named after `tag`, holding the tokens file.
    pub fn new(tag: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!(
            "flagstream-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokens"), TOKENS).unwrap();
        Dir(dir)
    }

    /// A writer over `data` in this directory (not started).
    pub fn writer(&self) -> Writer {
        Writer {
            port: free_port(),
            data: self.0.join("data"),
            dir: self.0.clone(),
            proc: None,
            starts: 0,
        }
    }

    /// A replica following `upstream` (not started).
    pub fn replica(&self, name: &str, upstream: &str, options: ReplicaOptions) -> Replica {
        Replica {
            name: name.to_string(),
            port: free_port(),
            metrics: free_port(),
            namespaces: options.namespaces.clone(),
            options,
            upstream: upstream.to_string(),
            dir: self.0.clone(),
            proc: None,
            starts: 0,
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // Logs are kept when the test failed, for the report.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("test files kept in {}", self.0.display());
        }
    }
}

impl Writer {
    /// Its URL, for replicas and the proxy.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the process and waits until it reports SERVING.
    pub async fn start(&mut self) {
        assert!(self.proc.is_none(), "the writer is running");
        self.starts += 1;
        let args = [
            "--listen".to_string(),
            format!("127.0.0.1:{}", self.port),
            "--data-dir".into(),
            self.data.display().to_string(),
            "--tokens-file".into(),
            self.dir.join("tokens").display().to_string(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--heartbeat-ms".into(),
            HEARTBEAT_MS.to_string(),
        ];
        let log = self.dir.join(format!("flagwrite-{}.log", self.starts));
        self.proc = Some(spawn("flagwrite", flagwrite_bin(), &args, &log));
        serving(self.port, "").await;
    }

    /// Kills it with SIGKILL.
    pub fn kill9(&mut self) {
        self.proc.take().expect("the writer is running").kill9();
    }

    /// Stops it with SIGTERM (a clean exit).
    pub fn terminate(&mut self) {
        self.proc.take().expect("the writer is running").terminate();
    }

    /// Whether the process is running.
    pub fn alive(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::alive)
    }

    /// A FlagAdmin client.
    pub async fn admin(&self) -> FlagAdminClient<Channel> {
        FlagAdminClient::new(channel(self.port).await)
    }

    /// The committed head revision (ListNamespaces answers it).
    pub async fn head(&self) -> u64 {
        let mut admin = self.admin().await;
        admin
            .list_namespaces(authed(pb::ListNamespacesRequest {}, ADMIN_READ))
            .await
            .unwrap()
            .into_inner()
            .revision
    }
}

impl Replica {
    /// Its snapshot file, if it keeps one.
    pub fn snapshot_path(&self) -> Option<PathBuf> {
        self.options
            .snapshot_file
            .then(|| self.dir.join(format!("{}.snapshot", self.name)))
    }

    /// Starts the process (it serves once it holds a full state; see [`Replica::serving`]).
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "{} is running", self.name);
        self.starts += 1;
        let o = &self.options;
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{}", self.port),
            "--upstream".into(),
            self.upstream.clone(),
            "--sync-token".into(),
            SYNC.into(),
            "--tokens-file".into(),
            self.dir.join("tokens").display().to_string(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", self.metrics),
            "--ofrep-listen".into(),
            "127.0.0.1:0".into(),
            "--backoff-min-ms".into(),
            o.backoff_min_ms.to_string(),
            "--backoff-max-ms".into(),
            o.backoff_max_ms.to_string(),
            "--upstream-silence-s".into(),
            o.silence_s.to_string(),
        ];
        if !o.namespaces.is_empty() {
            args.push("--namespaces".into());
            args.push(o.namespaces.join(","));
        }
        if let Some(path) = self.snapshot_path() {
            args.push("--snapshot-file".into());
            args.push(path.display().to_string());
            args.push("--snapshot-interval-ms".into());
            args.push("50".into());
        }
        let log = self.dir.join(format!("{}-{}.log", self.name, self.starts));
        self.proc = Some(spawn(
            &self.name,
            Path::new(env!("CARGO_BIN_EXE_flagread")),
            &args,
            &log,
        ));
    }

    /// Waits until it reports SERVING.
    pub async fn serving(&self) {
        serving(self.port, "flagstream.v1.FlagEval").await;
    }

    /// Kills it with SIGKILL.
    pub fn kill9(&mut self) {
        self.proc.take().expect("the replica is running").kill9();
    }

    /// Whether the process is running.
    pub fn alive(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::alive)
    }

    /// A FlagEval client.
    pub async fn eval(&self) -> FlagEvalClient<Channel> {
        FlagEvalClient::new(channel(self.port).await)
    }

    /// One metric of the replica.
    pub async fn metric(&self, name: &str) -> i64 {
        metric(self.metrics, name).await
    }
}

/// The flagwrite binary beside flagread's. Cargo only builds the binaries of the package under
/// test, so under `cargo test -p flagread` alone it may be missing or older than its sources;
/// then it is built here (once per run). Under `cargo test --workspace` it is fresh and used as
/// it is.
pub fn flagwrite_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let flagread = PathBuf::from(env!("CARGO_BIN_EXE_flagread"));
        let profile_dir = flagread.parent().unwrap().to_path_buf();
        let bin = profile_dir.join("flagwrite");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let sources = [
            "flagwrite",
            "src",
            "proto",
            "build.rs",
            "Cargo.toml",
            "Cargo.lock",
        ]
        .map(|p| root.join(p));
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        if built.is_some_and(|built| sources.iter().all(|s| newest(s) <= built)) {
            return bin;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "flagwrite",
                "--bin",
                "flagwrite",
                "--target-dir",
            ])
            .arg(profile_dir.parent().unwrap())
            .current_dir(&root);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        // Cargo gives tests the variables of the package under test; some build scripts track
        // them, so passing them on would rebuild the world on every run.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let per_package = [
                "CARGO_PKG_",
                "CARGO_BIN_EXE_",
                "CARGO_CRATE_",
                "CARGO_BIN_NAME",
            ]
            .iter()
            .any(|p| name.starts_with(p))
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&name.as_ref());
            if per_package {
                build.env_remove(name.as_ref());
            }
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building flagwrite failed");
        assert!(bin.exists(), "{} missing", bin.display());
        bin
    })
}

/// The latest modification time of `path` or anything below it.
fn newest(path: &Path) -> std::time::SystemTime {
    let Ok(meta) = std::fs::metadata(path) else {
        return std::time::SystemTime::UNIX_EPOCH;
    };
    let own = meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH);
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| newest(&entry.path()))
        .fold(own, std::cmp::max)
}

/// A loopback port nobody listens on (bound and released; a process binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// `message` with `authorization: Bearer <token>` and a 5 s deadline.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request.set_timeout(Duration::from_secs(5));
    request
}

/// A channel to `port`, retrying for up to 10 s while nothing listens yet.
pub async fn channel(port: u16) -> Channel {
    for _ in 0..500 {
        if let Ok(channel) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
        {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing listens on port {port}");
}

/// A channel to `port`, or `None` if nothing answers within a second.
pub async fn try_channel(port: u16) -> Option<Channel> {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()
}

/// Waits until the service on `port` reports SERVING for `service` (20 s at most).
pub async fn serving(port: u16, service: &str) {
    let mut health = HealthClient::new(channel(port).await);
    for _ in 0..1000 {
        let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        });
        request.set_timeout(Duration::from_secs(2));
        if let Ok(response) = health.check(request).await
            && response.into_inner().status == ServingStatus::Serving as i32
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("port {port} never became SERVING for {service:?}");
}

/// The value of one metric line of the `/metrics` endpoint on `port`.
pub async fn metric(port: u16, name: &str) -> i64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), socket.read_to_string(&mut text))
        .await
        .expect("/metrics answers within 5 s")
        .unwrap();
    let prefix = format!("{name} ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"));
    line[prefix.len()..].trim().parse().unwrap()
}

/// One metric of the `/metrics` endpoint on `port`, or `None` if it does not answer.
pub async fn try_metric(port: u16, name: &str) -> Option<i64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let read = async {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        socket.read_to_string(&mut text).await.ok()?;
        let prefix = format!("{name} ");
        let line = text.lines().find(|l| l.starts_with(&prefix))?;
        line[prefix.len()..].trim().parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()?
}

/// The suite's number of cycles for a repeated fault: `FLAGSTREAM_FAULT_CYCLES`, or `default`.
pub fn cycles(default: u32) -> u32 {
    std::env::var("FLAGSTREAM_FAULT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Waits until every replica has converged to the writer, or `deadline` has passed. Returns
/// how long it took, or what still differs.
///
/// A replica has converged when both checks hold at once:
/// - the observed state: its applied revision is the writer's head, and for every namespace it
///   follows it serves exactly the writer's flags, each at the writer's revision of it
///   (`EvaluateAll` against `ExportNamespace`), and it holds no flag beyond them (its
///   `flagread_flags` metric is the writer's count), and
/// - the product's own checker: `GetStateDigest` on the replica answers the revision, history
///   position (`chain`) and digest the writer's `GetStateDigest` answers for the replica's
///   namespaces.
pub async fn converged(
    writer: &Writer,
    replicas: &[&Replica],
    deadline: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut admin = writer.admin().await;
    let mut evals: Vec<Option<FlagEvalClient<Channel>>> = replicas.iter().map(|_| None).collect();
    loop {
        let mut difference = None;
        for (replica, eval) in replicas.iter().zip(evals.iter_mut()) {
            if eval.is_none() {
                *eval = try_channel(replica.port).await.map(FlagEvalClient::new);
            }
            let Some(client) = eval.as_mut() else {
                difference = Some(format!("{}: unreachable", replica.name));
                break;
            };
            if let Err(why) = replica_matches(&mut admin, replica, client).await {
                difference = Some(format!("{}: {why}", replica.name));
                break;
            }
        }
        match difference {
            None => return Ok(start.elapsed()),
            Some(why) if start.elapsed() >= deadline => {
                return Err(format!("not converged after {deadline:?}: {why}"));
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// Whether `replica` holds the writer's state now (see [`converged`]).
async fn replica_matches(
    admin: &mut FlagAdminClient<Channel>,
    replica: &Replica,
    eval: &mut FlagEvalClient<Channel>,
) -> Result<(), String> {
    let listed = admin
        .list_namespaces(authed(pb::ListNamespacesRequest {}, ADMIN_READ))
        .await
        .map_err(|s| format!("writer: {s}"))?
        .into_inner();
    let head = listed.revision;
    let followed: Vec<String> = listed
        .namespaces
        .iter()
        .map(|n| n.key.clone())
        .filter(|k| replica.namespaces.is_empty() || replica.namespaces.contains(k))
        .collect();
    let mut writer_flags = 0;
    for namespace in &followed {
        let export = admin
            .export_namespace(authed(
                pb::ExportNamespaceRequest {
                    namespace: namespace.clone(),
                },
                ADMIN_READ,
            ))
            .await
            .map_err(|s| format!("writer export {namespace}: {s}"))?
            .into_inner();
        if export.revision != head {
            return Err("the writer moved on during the check".into());
        }
        let bundle = export.bundle.unwrap_or_default();
        // Flag key → the flag's revision. Segments are compared by the digest alone: FlagEval
        // does not list them.
        let want: BTreeMap<String, u64> = bundle
            .flags
            .iter()
            .map(|f| {
                (
                    f.key.clone(),
                    f.stamp.as_ref().map_or(0, |s| s.updated_revision),
                )
            })
            .collect();
        writer_flags += want.len();
        let all = eval
            .evaluate_all(authed(
                pb::EvaluateAllRequest {
                    namespace: namespace.clone(),
                    ..Default::default()
                },
                EVAL,
            ))
            .await
            .map_err(|s| format!("EvaluateAll {namespace}: {s}"))?
            .into_inner();
        if all.revision != head {
            return Err(format!(
                "at revision {}, the writer at {head}",
                all.revision
            ));
        }
        let got: BTreeMap<String, u64> = all
            .results
            .iter()
            .map(|r| (r.flag_key.clone(), r.flag_revision))
            .collect();
        if got != want {
            let missing = want.keys().filter(|k| !got.contains_key(*k)).count();
            let extra = got.keys().filter(|k| !want.contains_key(*k)).count();
            return Err(format!(
                "namespace {namespace} differs: {missing} flags missing, {extra} extra, at revision {head}"
            ));
        }
    }
    let held = try_metric(replica.metrics, "flagread_flags")
        .await
        .ok_or("its metrics do not answer")?;
    if held != writer_flags as i64 {
        return Err(format!(
            "holds {held} flags, the writer {writer_flags} in the namespaces it follows"
        ));
    }
    digests_match(admin, replica, eval, head).await
}

/// The product's convergence checker: `GetStateDigest` on both sides agrees on revision,
/// history position and digest, at the writer's head `head`.
async fn digests_match(
    admin: &mut FlagAdminClient<Channel>,
    replica: &Replica,
    eval: &mut FlagEvalClient<Channel>,
    head: u64,
) -> Result<(), String> {
    let theirs = admin
        .get_state_digest(authed(
            pb::GetStateDigestRequest {
                namespaces: replica.namespaces.clone(),
            },
            ADMIN_READ,
        ))
        .await
        .map_err(|s| format!("writer GetStateDigest: {s}"))?
        .into_inner();
    if theirs.revision != head {
        return Err("the writer moved on during the check".into());
    }
    let mine = eval
        .get_state_digest(authed(pb::GetStateDigestRequest::default(), EVAL))
        .await
        .map_err(|s| format!("GetStateDigest: {s}"))?
        .into_inner();
    let key = |d: &pb::StateDigest| (d.revision, d.chain.clone(), d.digest.clone());
    if key(&mine) != key(&theirs) {
        return Err(format!(
            "GetStateDigest differs: replica revision {} chain {} digest {} ({} flags), writer revision {} chain {} digest {} ({} flags)",
            mine.revision,
            mine.chain,
            mine.digest,
            mine.flag_count,
            theirs.revision,
            theirs.chain,
            theirs.digest,
            theirs.flag_count
        ));
    }
    Ok(())
}
