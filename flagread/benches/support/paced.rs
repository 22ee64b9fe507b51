//! An open-loop load generator for latency at a set rate.
//!
//! h2load's `--rps` releases every connection's due requests on one 10 ms
//! tick, all connections in step (see `h2load::Pacing`), so at 70% load each
//! tick brings 7 ms of work at once and the p99 is that burst, whatever the
//! server. Real traffic comes from many independent clients. This generator
//! sends request `i` at `start + i / rate`, round-robin over its connections,
//! whether or not earlier answers have come back (open loop), and times each
//! request from the moment it was *due* to the end of its answer (trailers
//! included). A request that leaves late, because the generator's thread was
//! descheduled or a connection had no stream free, is charged for the wait:
//! there is no coordinated omission.
//!
//! A clock thread sleeps until each request is due (`std::thread::sleep`, tens
//! of microseconds late on this machine, unlike tokio's 1 ms timer) and hands
//! it to a current-thread runtime, which sends it on one of its connections
//! (`support::h2raw`: prebuilt frames, answers checked by length). The
//! generator's whole process costs about 8 µs of CPU per call here (12 µs
//! with the `h2` crate), system calls included: at the 90,000 calls/s the
//! echo server is paced at, that is most of a core, so such runs are at the
//! generator's limit. Each run reports how late the generator got.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::h2raw::{Connection, Finished, Request};

/// One paced run.
pub struct Paced {
    pub addr: SocketAddr,
    /// gRPC path, e.g. `/flagstream.v1.FlagEval/Evaluate`.
    pub path: &'static str,
    /// `authorization` header value, if the server wants one.
    pub authorization: Option<String>,
    /// The whole request body: a gRPC frame (prefix + message).
    pub frame: Vec<u8>,
    /// Length of every answer's body (gRPC prefix included); an answer of
    /// another length is a failure.
    pub response_len: usize,
    pub connections: usize,
    /// Requests per second, spread evenly.
    pub rate: f64,
    /// Paced but not measured, first.
    pub warm_up: Duration,
    pub measured: Duration,
    /// The CPU the generator's two threads are pinned to, if any.
    pub cpu: Option<usize>,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct PacedOutcome {
    /// Due-to-done latency (ms) of every measured request that succeeded.
    pub latencies_ms: Vec<f64>,
    /// Measured requests that failed (transport error, HTTP or gRPC status,
    /// wrong length), with the first failure's description.
    pub failed: u64,
    pub first_failure: Option<String>,
    /// Answered measured requests per second of measured time.
    pub answered_per_s: f64,
    /// The longest a call waited between being due and its frames being
    /// queued for the socket (ms): the generator's own lateness.
    pub max_behind_ms: f64,
}

impl Paced {
    /// Runs to completion on threads of its own.
    pub fn run(self) -> PacedOutcome {
        let warm_up_count = (self.warm_up.as_secs_f64() * self.rate).round() as u64;
        let total = warm_up_count + (self.measured.as_secs_f64() * self.rate).round() as u64;
        let cpu = self.cpu;
        let rate = self.rate;
        let (due_tx, due_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let (start_tx, start_rx) = std::sync::mpsc::channel::<Instant>();

        let clock = std::thread::Builder::new()
            .name("paced-clock".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_current_thread(cpu);
                }
                // Starts once the runtime has its connections up.
                let Ok(start) = start_rx.recv() else { return };
                for i in 0..total {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if due > now + Duration::from_micros(20) {
                        std::thread::sleep(due - now);
                    }
                    if due_tx.send(due).is_err() {
                        return;
                    }
                }
            })
            .expect("the clock thread starts");

        let records = std::thread::Builder::new()
            .name("paced-load".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_current_thread(cpu);
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime starts");
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, self.drive(warm_up_count, due_rx, start_tx))
            })
            .expect("the load thread starts")
            .join()
            .expect("the load thread does not panic");
        clock.join().expect("the clock thread does not panic");
        let (records, measured_start) = records;
        summarize(records, measured_start)
    }

    /// Opens the connections, starts the clock, hands each due call to a
    /// connection in turn, and returns every call's record once all are
    /// answered, with the due time of the first measured one.
    async fn drive(
        self,
        warm_up_count: u64,
        mut due_rx: tokio::sync::mpsc::UnboundedReceiver<Instant>,
        start_tx: std::sync::mpsc::Sender<Instant>,
    ) -> (Vec<Finished>, Instant) {
        let request = Rc::new(Request::new(
            &self.addr.to_string(),
            self.path,
            self.authorization.as_deref(),
            self.frame.clone(),
            self.response_len,
        ));
        let finished = Rc::new(RefCell::new(Vec::new()));
        let mut connections = Vec::with_capacity(self.connections);
        for _ in 0..self.connections {
            connections
                .push(Connection::open(self.addr, Rc::clone(&request), Rc::clone(&finished)).await);
        }
        let start = Instant::now() + Duration::from_millis(2);
        start_tx
            .send(start)
            .expect("the clock thread waits for the start");
        let mut submitted = 0usize;
        while let Some(due) = due_rx.recv().await {
            connections[submitted % connections.len()].submit(due);
            submitted += 1;
        }
        // Every call ends: answered, failed, or (after this long) given up on.
        let give_up = Instant::now() + Duration::from_secs(30);
        while finished.borrow().len() < submitted && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut records: Vec<Finished> = finished.borrow_mut().drain(..).collect();
        let unanswered = submitted - records.len();
        for _ in 0..unanswered {
            records.push(Finished {
                due: give_up,
                sent: give_up,
                done: give_up,
                result: Err(format!(
                    "{unanswered} calls unanswered 30 s after the last was due"
                )),
            });
        }
        let measured_start = start + Duration::from_secs_f64(warm_up_count as f64 / self.rate);
        (records, measured_start)
    }
}

fn summarize(records: Vec<Finished>, measured_start: Instant) -> PacedOutcome {
    // The warm-up's calls are not measured.
    let records: Vec<Finished> = records
        .into_iter()
        .filter(|record| record.due >= measured_start)
        .collect();
    let first_due = records.iter().map(|r| r.due).min();
    let last_done = records.iter().map(|r| r.done).max();
    let mut outcome = PacedOutcome {
        latencies_ms: Vec::with_capacity(records.len()),
        failed: 0,
        first_failure: None,
        answered_per_s: 0.0,
        max_behind_ms: 0.0,
    };
    let (Some(first_due), Some(last_done)) = (first_due, last_done) else {
        return outcome;
    };
    for record in records {
        outcome.max_behind_ms = outcome.max_behind_ms.max(
            record
                .sent
                .saturating_duration_since(record.due)
                .as_secs_f64()
                * 1e3,
        );
        match record.result {
            Ok(()) => {
                let ms = (record.done - record.due).as_secs_f64() * 1e3;
                outcome.latencies_ms.push(ms);
            }
            Err(failure) => {
                outcome.failed += 1;
                outcome.first_failure.get_or_insert(failure);
            }
        }
    }
    outcome.answered_per_s =
        outcome.latencies_ms.len() as f64 / (last_done - first_due).as_secs_f64().max(1e-9);
    outcome
}

/// Pins the calling thread to `cpu` with util-linux's `taskset` (the crates
/// forbid `unsafe`, and this keeps the benchmark free of it too).
pub fn pin_current_thread(cpu: usize) {
    let link = std::fs::read_link("/proc/thread-self").expect("Linux's /proc/thread-self");
    let tid = link
        .file_name()
        .and_then(|name| name.to_str())
        .expect("/proc/thread-self names the thread")
        .to_string();
    pin(&tid, cpu, false);
}

/// Pins process (or thread) `id` to `cpu`; with `all_threads`, every thread
/// of the process.
pub fn pin(id: &str, cpu: usize, all_threads: bool) {
    let mut command = std::process::Command::new("taskset");
    if all_threads {
        command.arg("-a");
    }
    let output = command
        .args(["-p", "-c", &cpu.to_string(), id])
        .output()
        .expect("taskset (util-linux) runs");
    assert!(
        output.status.success(),
        "taskset -p -c {cpu} {id} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
