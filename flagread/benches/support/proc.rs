//! Child processes owned by a benchmark: each is killed when its handle drops,
//! and a watchdog kills all of them (and ends the benchmark) when the run
//! exceeds its time budget or the user presses Ctrl-C, so no server outlives
//! the benchmark that started it.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// Process ids of every live child, for the watchdog.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Scratch directories of the run, removed by the watchdog too.
static RUN_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A spawned server; killed (SIGKILL) and reaped on drop.
pub struct Proc {
    /// Name used in messages, e.g. `flagread-3`.
    pub name: String,
    child: Child,
    /// Where its stderr and stdout go, for the post-mortem when it misbehaves.
    pub log: PathBuf,
    /// Ask it to stop with SIGTERM first (for a wrapping profiler, which
    /// must write its data before it goes).
    pub graceful: bool,
}

impl Proc {
    /// Spawns `command` with both output streams appended to `<dir>/<name>.log`.
    pub fn spawn(name: &str, mut command: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("the run directory is writable");
        // Its own process group, so that killing the group also ends whatever
        // it started (a profiler wrapping a server, say).
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(
                file.try_clone()
                    .expect("a log file handle can be duplicated"),
            )
            .stderr(file);
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("could not start {name} ({command:?}): {error}"));
        CHILDREN.lock().unwrap().push(child.id());
        Proc {
            name: name.to_string(),
            child,
            log,
            graceful: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit by itself, killing it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("the child can be waited for") {
                return status;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("{} did not finish within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics with the tail of its log if the process has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "{} exited with {status}; last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.graceful {
            signal_group("-TERM", self.child.id());
            for _ in 0..150 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        signal_group("-KILL", self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        CHILDREN
            .lock()
            .unwrap()
            .retain(|pid| *pid != self.child.id());
    }
}

/// A command running `program`, confined to `cpu` from its first instruction
/// (util-linux's `taskset`) if one is given.
pub fn command_on(cpu: Option<usize>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut command = Command::new("taskset");
            command.arg("-c").arg(cpu.to_string()).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// The pids of the live children (servers, h2load) this process started.
pub fn children() -> Vec<u32> {
    CHILDREN.lock().unwrap().clone()
}

/// Kills every live child and removes the run directories. Used by the
/// watchdog, the Ctrl-C handler and the panic hook, which end the process
/// without running destructors.
pub fn kill_all() {
    for pid in CHILDREN.lock().unwrap().drain(..) {
        signal_group("-KILL", pid);
    }
    if std::env::var_os("FLAGSTREAM_BENCH_KEEP").is_none() {
        for dir in RUN_DIRS.lock().unwrap().drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Sends a signal to the process group a child leads (see `Proc::spawn`).
fn signal_group(signal: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(signal)
        .arg("--")
        .arg(format!("-{pid}"))
        .stderr(Stdio::null())
        .status();
}

/// Bounds the benchmark: after `budget`, or on Ctrl-C, kill every child and
/// exit with status 2. The thread ends with the process.
pub fn watchdog(budget: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(budget);
        eprintln!("benchmark exceeded its time budget of {budget:?}; killing its processes");
        kill_all();
        std::process::exit(2);
    });
    std::thread::spawn(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(runtime) = runtime
            && runtime.block_on(tokio::signal::ctrl_c()).is_ok()
        {
            eprintln!("interrupted; killing the benchmark's processes");
            kill_all();
            std::process::exit(130);
        }
    });
    // A panic anywhere must not leave servers behind either.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        kill_all();
        std::process::exit(101);
    }));
}

/// A scratch directory for one run (tokens, data directories, logs), removed
/// on drop unless `FLAGSTREAM_BENCH_KEEP` is set.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new(bench: &str) -> RunDir {
        let path =
            std::env::temp_dir().join(format!("flagstream-bench-{bench}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("the temporary directory is writable");
        RUN_DIRS.lock().unwrap().push(path.clone());
        RunDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::env::var_os("FLAGSTREAM_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("kept {}", self.0.display());
        }
    }
}

/// A loopback port that was free a moment ago. The servers take addresses on
/// their command line, so the benchmark picks them (the tiny race with other
/// programs binding the same port is acceptable for a benchmark).
/// A port is never handed out twice in one run: with a hundred replicas
/// (three ports each) started at once, the kernel would otherwise hand a
/// closed, not yet bound port out again, and one of the two replicas fails.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a loopback port is available");
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The directory holding the release binaries (`flagread`, `flagwrite`):
/// where cargo put `flagread` for this benchmark.
pub fn bin_dir() -> PathBuf {
    let flagread = PathBuf::from(env!("CARGO_BIN_EXE_flagread"));
    flagread
        .parent()
        .expect("a binary lives in a directory")
        .to_path_buf()
}

/// Path of one of the workspace's binaries, checking it was built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --profile bench -p {name}` (the scripts/bench-*.sh do)",
        path.display()
    );
    path
}
