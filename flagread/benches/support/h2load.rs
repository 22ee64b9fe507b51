//! Drives h2load (Debian's nghttp2-client) with a pre-encoded gRPC frame and
//! reads its summary and per-request log.
//!
//! h2load does not look at gRPC trailers, so a call failing with a non-zero
//! grpc-status would still count as an HTTP 200. Two checks close that hole:
//! the benchmark first sends the same frame with a gRPC client that does check
//! grpc-status and decodes the answer, and after every run it checks that
//! h2load received at least one whole response message (prefix + body of the
//! known, constant length) per successful request: a failed gRPC call carries
//! no message at all, so any failures beyond the few streams still in flight
//! at the end (whose partial bodies h2load also counts) are caught.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::proc::Proc;

/// One h2load invocation.
pub struct Load<'a> {
    /// Full URL, e.g. `http://127.0.0.1:5000/flagstream.v1.FlagEval/Evaluate`.
    pub url: String,
    /// File holding the request frame sent as every request's body.
    pub frame: &'a Path,
    /// Extra headers (`authorization`).
    pub headers: Vec<String>,
    /// Connections.
    pub clients: u32,
    /// Streams in flight per connection.
    pub streams: u32,
    /// Measured seconds.
    pub seconds: u32,
    /// How requests are paced.
    pub pacing: Pacing,
    /// Where to write the per-request log (for latency percentiles).
    pub log_file: Option<PathBuf>,
}

/// How h2load paces its requests.
#[derive(Debug, Clone, Copy)]
pub enum Pacing {
    /// As fast as the streams allow.
    Max,
    /// h2load's `--rps`: this many requests per second on each connection.
    /// h2load releases a connection's due requests on a timer that ticks every
    /// `1/rps` seconds but at least every 10 ms. Above 100 requests/s per
    /// connection, every connection therefore sends 10 ms worth of requests at
    /// once, all connections in step: at 70% load each burst is 7 ms of work,
    /// and the last request of a burst waits for the others whatever the
    /// server; once the rate per connection is above 16 streams per tick,
    /// the streams limit the burst instead, and a request waits about
    /// `connections × streams / maximum rate`. h2load times a request from
    /// when it gets a stream: the time a due request waits for one is not
    /// counted, so too few streams flatter the latency.
    Rps(u32),
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub req_per_s: f64,
    pub started: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    pub data_bytes: u64,
    /// The raw summary, kept for the post-mortem.
    pub summary: String,
}

impl Load<'_> {
    /// Runs h2load to completion (bounded by its own duration plus a margin).
    ///
    /// h2load's own `--warm-up-time` is not used: its byte counts would then
    /// include the warm-up's responses and the per-request check below could
    /// not be exact. Warm up with a separate short run instead.
    pub fn run(&self, dir: &Path, name: &str) -> Outcome {
        let command = self.command(self.clients, self.log_file.as_deref());
        let mut process = Proc::spawn(name, command, dir);
        self.finish(&mut process)
    }

    /// Runs the load as `processes` h2load processes of `clients / processes`
    /// connections each, started one [`TICK`] / `processes` apart, and returns
    /// each one's outcome and per-request log (`<log_file>.<i>`).
    ///
    /// Under [`Pacing::Rps`] a process releases its requests every tick from
    /// the moment its connections are up, so one process sends all of them in
    /// step; staggered processes tick at different moments, as independent
    /// clients do. (Process start-up jitters, so the moments are only roughly
    /// evenly spaced: [`tick_phase_ms`] tells where each one landed.)
    pub fn run_spread(&self, dir: &Path, name: &str, processes: u32) -> Vec<(Outcome, PathBuf)> {
        assert!(
            processes >= 1 && self.clients.is_multiple_of(processes),
            "{} connections do not split evenly into {processes} processes",
            self.clients
        );
        let log_base = self
            .log_file
            .clone()
            .unwrap_or_else(|| dir.join(format!("{name}.requests")));
        let mut running = Vec::new();
        for i in 0..processes {
            if i > 0 {
                std::thread::sleep(TICK / processes);
            }
            let log = log_base.with_extension(i.to_string());
            let _ = std::fs::remove_file(&log);
            let command = self.command(self.clients / processes, Some(&log));
            running.push((Proc::spawn(&format!("{name}-{i}"), command, dir), log));
        }
        running
            .into_iter()
            .map(|(mut process, log)| (self.finish(&mut process), log))
            .collect()
    }

    fn command(&self, clients: u32, log_file: Option<&Path>) -> Command {
        let mut command = Command::new(h2load_path());
        command
            .arg(format!("--clients={clients}"))
            .arg(format!("--max-concurrent-streams={}", self.streams))
            .arg("--threads=1")
            .arg(format!("--data={}", self.frame.display()))
            .arg("--header=content-type: application/grpc")
            .arg("--header=te: trailers");
        for header in &self.headers {
            command.arg(format!("--header={header}"));
        }
        command.arg(format!("--duration={}", self.seconds));
        if let Pacing::Rps(rps) = self.pacing {
            command.arg(format!("--rps={rps}"));
        }
        if let Some(log) = log_file {
            command.arg(format!("--log-file={}", log.display()));
        }
        command.arg(&self.url);
        command
    }

    /// Waits for an h2load process (bounded by its duration plus a margin)
    /// and reads its summary.
    fn finish(&self, process: &mut Proc) -> Outcome {
        let status = process.wait(Duration::from_secs(u64::from(self.seconds) + 30));
        let summary = std::fs::read_to_string(&process.log).unwrap_or_default();
        assert!(status.success(), "h2load failed ({status}):\n{summary}");
        parse(&summary)
    }
}

/// How often h2load's `--rps` timer releases a connection's due requests (at
/// most; less often only below 100 requests/s per connection).
pub const TICK: Duration = Duration::from_millis(10);

/// `h2load` from PATH, or `FLAGSTREAM_H2LOAD`.
pub fn h2load_path() -> PathBuf {
    std::env::var_os("FLAGSTREAM_H2LOAD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("h2load"))
}

/// Checks that h2load is installed, with the fix in the message.
pub fn require() {
    let found = Command::new(h2load_path())
        .arg("--version")
        .output()
        .map(|out| out.status.success());
    assert!(
        matches!(found, Ok(true)),
        "h2load is missing: `apt-get install -y nghttp2-client` (scripts/bench-read.sh does it), or set FLAGSTREAM_H2LOAD"
    );
}

fn number_before(text: &str, marker: &str) -> Option<u64> {
    let end = text.find(marker)?;
    let start = text[..end].rfind([' ', '(']).map_or(0, |i| i + 1);
    text[start..end].trim().parse().ok()
}

/// Reads h2load's summary lines:
/// `finished in 10.00s, 95000.00 req/s, 9.5MB/s`,
/// `requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout`,
/// `traffic: … total, … headers (…), 12.3MB (12345678) data`.
pub fn parse(summary: &str) -> Outcome {
    let line = |prefix: &str| {
        summary
            .lines()
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("h2load printed no `{prefix}` line:\n{summary}"))
    };
    let finished = line("finished in");
    let req_per_s = finished
        .split(',')
        .find_map(|part| part.trim().strip_suffix(" req/s"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unreadable h2load line {finished:?}"));
    let requests = line("requests:");
    let count = |what: &str| number_before(requests, &format!(" {what}")).unwrap_or(0);
    let traffic = line("traffic:");
    let data_bytes = traffic
        .rsplit_once(") data")
        .and_then(|(head, _)| head.rsplit_once('('))
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable h2load line {traffic:?}"));
    Outcome {
        req_per_s,
        started: count("started"),
        done: count("done"),
        succeeded: count("succeeded"),
        failed: count("failed"),
        errored: count("errored"),
        timeout: count("timeout"),
        data_bytes,
        summary: summary.to_string(),
    }
}

impl Outcome {
    /// Panics unless every request succeeded and carried one whole response
    /// message of `response_len` bytes (see the module documentation).
    pub fn check(&self, what: &str, response_len: usize) {
        assert!(
            self.succeeded > 0 && self.failed == 0 && self.errored == 0 && self.timeout == 0,
            "{what}: h2load saw failures:\n{}",
            self.summary
        );
        // Streams still in flight when h2load stops may have received part
        // of their body without counting as done, hence the upper bound.
        let each = response_len as u64 + 5;
        let (least, most) = (self.succeeded * each, self.started * each);
        assert!(
            (least..=most).contains(&self.data_bytes),
            "{what}: {} response bytes for {} requests, expected at least {least} ({each} each): some calls did not answer grpc-status 0\n{}",
            self.data_bytes,
            self.succeeded,
            self.summary
        );
    }
}

/// One request of h2load's `--log-file`: `start_us<TAB>status<TAB>duration_us`,
/// the start in microseconds since the Unix epoch.
struct Logged {
    start_us: u64,
    status: i32,
    duration_us: u64,
}

fn read_log(log: &Path) -> Vec<Logged> {
    let text = std::fs::read_to_string(log)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", log.display()));
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            Some(Logged {
                start_us: fields.next()?.trim().parse().ok()?,
                status: fields.next()?.trim().parse().ok()?,
                duration_us: fields.next()?.trim().parse().ok()?,
            })
        })
        .collect()
}

/// Latencies (ms) of the successful requests in h2load's `--log-file`.
pub fn latencies_ms(log: &Path) -> Vec<f64> {
    read_log(log)
        .into_iter()
        .filter(|r| r.status == 200)
        .map(|r| r.duration_us as f64 / 1000.0)
        .collect()
}

/// Where in the [`TICK`] a process's requests start, in ms from 0 to 10: the
/// circular mean of every request's start time modulo the tick.
pub fn tick_phase_ms(log: &Path) -> f64 {
    let tick_us = TICK.as_micros() as u64;
    let (mut x, mut y) = (0.0f64, 0.0f64);
    for request in read_log(log) {
        let turn = (request.start_us % tick_us) as f64 / tick_us as f64;
        x += (turn * std::f64::consts::TAU).cos();
        y += (turn * std::f64::consts::TAU).sin();
    }
    let turn = y.atan2(x).rem_euclid(std::f64::consts::TAU) / std::f64::consts::TAU;
    turn * TICK.as_secs_f64() * 1000.0
}
