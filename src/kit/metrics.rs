//! Prometheus metrics without a metrics framework: a few atomic primitives,
//! rendering in the Prometheus text exposition format (version 0.0.4), and a
//! tiny HTTP/1.1 server answering `GET /metrics`.
//!
//! A service keeps its metrics in a struct of these primitives and renders
//! them with [`Text`]; [`serve`] calls that render function per scrape.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A monotonically increasing count, split by label values.
#[derive(Debug, Default)]
pub struct CounterVec {
    /// Label values (in the order of the label names given to `render`) to count.
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge {
    value: AtomicI64,
}

/// A latency histogram in seconds with fixed bucket bounds.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative; summed when rendering).
    buckets: Vec<AtomicU64>,
    /// Sum of observations in microseconds, kept integral to stay atomic.
    sum_micros: AtomicU64,
}

/// Builds one scrape's text.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
}

/// Bucket bounds suited to durable writes: 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

impl CounterVec {
    /// Adds one to the series with these label values.
    pub fn inc(&self, labels: &[&str]) {
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        *values.entry(key).or_insert(0) += 1;
    }
}

impl Gauge {
    /// Sets the value.
    pub fn set(&self, value: i64) {
        self.value.store(value, Ordering::Relaxed);
    }

    /// Adds `delta` (may be negative).
    pub fn add(&self, delta: i64) {
        self.value.fetch_add(delta, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }
}

impl Histogram {
    /// A histogram with the given upper bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, duration: std::time::Duration) {
        let secs = duration.as_secs_f64();
        let index = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }
}

impl Text {
    /// Renders a counter family.
    pub fn counter_vec(&mut self, name: &str, help: &str, labels: &[&str], counter: &CounterVec) {
        self.header(name, help, "counter");
        let values = counter.values.lock().unwrap_or_else(|e| e.into_inner());
        for (values, count) in values.iter() {
            let _ = writeln!(self.out, "{name}{} {count}", label_set(labels, values));
        }
    }

    /// Renders a counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: i64) {
        self.header(name, help, "counter");
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// Renders a gauge.
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) {
        self.header(name, help, "gauge");
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// Renders a gauge family with one series per label value set.
    pub fn gauge_vec(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        series: impl IntoIterator<Item = (Vec<String>, i64)>,
    ) {
        self.header(name, help, "gauge");
        for (values, value) in series {
            let _ = writeln!(self.out, "{name}{} {value}", label_set(labels, &values));
        }
    }

    /// Renders a counter family with one series per label value set.
    pub fn counter_series<'v, const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str; N],
        series: impl IntoIterator<Item = ([&'v str; N], u64)>,
    ) {
        self.header(name, help, "counter");
        for (values, count) in series {
            let _ = writeln!(self.out, "{name}{} {count}", label_set(labels, &values));
        }
    }

    /// Renders a histogram.
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.header(name, help, "histogram");
        let mut cumulative = 0;
        for (i, bound) in histogram.bounds.iter().enumerate() {
            cumulative += histogram.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(self.out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += histogram.buckets[histogram.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(self.out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(self.out, "{name}_sum {sum}");
        // The count is the +Inf bucket, so the two always agree.
        let _ = writeln!(self.out, "{name}_count {cumulative}");
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.out
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
}

/// Formats `{a="x",b="y"}` with Prometheus escaping.
fn label_set(names: &[&str], values: &[impl AsRef<str>]) -> String {
    let pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| {
            let v = v
                .as_ref()
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{n}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", pairs.join(","))
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes, calling
/// `render` per scrape. Other paths get 404. Each connection is answered once
/// and closed, which is all Prometheus needs.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (mut socket, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                // Accept errors (e.g. out of file descriptors) are transient;
                // back off briefly rather than spin.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let render = render.clone();
        // The task ends when the answer is written or the client stalls past
        // the timeout.
        tokio::spawn(async move {
            let answer = async {
                let mut buf = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    let n = socket.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
                let line = String::from_utf8_lossy(line);
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status, body) =
                    if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                        ("200 OK", render())
                    } else {
                        ("404 Not Found", "not found; try /metrics\n".to_string())
                    };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                socket.write_all(head.as_bytes()).await?;
                socket.write_all(body.as_bytes()).await?;
                socket.shutdown().await
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), answer).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let writes = CounterVec::default();
        writes.inc(&["CreateFlag", "ok"]);
        writes.inc(&["CreateFlag", "ok"]);
        writes.inc(&["UpdateFlag", "aborted"]);
        let latency = Histogram::new(&[0.001, 0.01]);
        latency.observe(std::time::Duration::from_micros(500));
        latency.observe(std::time::Duration::from_millis(5));
        latency.observe(std::time::Duration::from_secs(1));
        let mut text = Text::default();
        text.counter_vec("w_total", "Writes.", &["rpc", "outcome"], &writes);
        text.gauge("head", "Head.", 7);
        text.histogram("lat_seconds", "Latency.", &latency);
        let out = text.finish();
        for line in [
            "# TYPE w_total counter",
            "w_total{rpc=\"CreateFlag\",outcome=\"ok\"} 2",
            "w_total{rpc=\"UpdateFlag\",outcome=\"aborted\"} 1",
            "head 7",
            "lat_seconds_bucket{le=\"0.001\"} 1",
            "lat_seconds_bucket{le=\"0.01\"} 2",
            "lat_seconds_bucket{le=\"+Inf\"} 3",
            "lat_seconds_count 3",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }
}
