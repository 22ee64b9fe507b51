//! Prometheus metrics through `prometheus-client`: a lock-free latency histogram both services
//! keep on their hot paths, and a tiny HTTP/1.1 server answering `GET /metrics` from a
//! [`Registry`], rendered on the blocking pool.
//!
//! Each service builds one [`Registry`] at start: counters and gauges it updates are
//! `prometheus-client` handles registered there; values read from elsewhere at scrape time (the
//! replica's state, the writer's subscribers) come from a `Collector` registered beside them.
//! The exposition format is the Prometheus text format 0.0.4, so counter names keep their
//! `_total` suffix and no scraper needs OpenMetrics.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A latency histogram in seconds with fixed bucket bounds, updated with relaxed atomics only.
///
/// `prometheus_client::metrics::histogram::Histogram` takes a mutex per observation; flagread
/// observes one per evaluation call on every core, so this one stays lock-free. The sum is kept
/// in whole nanoseconds (the resolution of [`Duration`]), so sub-microsecond observations are
/// counted in `_sum`; a `u64` of nanoseconds lasts 584 years of summed latency. Clones share
/// the counts (one is registered, the other observes), as `prometheus-client`'s metrics do.
#[derive(Debug, Clone)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds in seconds, ascending.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative; summed when encoding), one more for `+Inf`.
    buckets: Box<[AtomicU64]>,
    /// Sum of observations in nanoseconds.
    sum_nanos: AtomicU64,
}

/// Bucket bounds suited to durable writes: 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// The `Content-Type` of what [`serve`] answers.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

impl Histogram {
    /// A histogram with the given upper bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            inner: Arc::new(HistogramInner {
                bounds,
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Records one observation.
    pub fn observe(&self, duration: Duration) {
        let inner = &*self.inner;
        let secs = duration.as_secs_f64();
        let index = inner
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(inner.bounds.len());
        inner.buckets[index].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &*self.inner;
        // The encoder takes each bucket's own count and accumulates them itself.
        let mut total = 0;
        let mut buckets = Vec::with_capacity(inner.buckets.len());
        for (i, count) in inner.buckets.iter().enumerate() {
            let count = count.load(Ordering::Relaxed);
            total += count;
            let bound = inner.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, count));
        }
        let sum = inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        // The count is the sum of the buckets, so it always agrees with `+Inf`.
        encoder.encode_histogram::<NoLabelSet>(sum, total, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Encodes every metric of `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a collector's error leaves what came before it.
    if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(%error, "encoding the metrics failed part way");
    }
    out
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes, encoding `registry` per
/// scrape on the blocking pool (a replica's registry walks every evaluated flag, which must not
/// hold up an async worker). Other paths get 404. Each connection is answered once and closed,
/// which is all Prometheus needs.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        // The task ends when the answer is written or the client stalls past the timeout; the
        // blocking render it may wait for ends by itself.
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
                let (status, content_type, body) =
                    if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                        let body = tokio::task::spawn_blocking(move || render(&registry))
                            .await
                            .map_err(std::io::Error::other)?;
                        ("200 OK", CONTENT_TYPE, body)
                    } else {
                        (
                            "404 Not Found",
                            "text/plain; charset=utf-8",
                            "not found; try /metrics\n".to_string(),
                        )
                    };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                socket.write_all(head.as_bytes()).await?;
                socket.write_all(body.as_bytes()).await?;
                socket.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), answer).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    #[test]
    fn renders_prometheus_text() {
        let mut registry = Registry::default();
        let writes = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register("w", "Writes", writes.clone());
        writes
            .get_or_create(&[("rpc", "CreateFlag"), ("outcome", "ok")])
            .inc_by(2);
        writes
            .get_or_create(&[("rpc", "UpdateFlag"), ("outcome", "aborted")])
            .inc();
        let latency = Histogram::new(&[0.001, 0.01]);
        latency.observe(Duration::from_micros(500));
        latency.observe(Duration::from_millis(5));
        latency.observe(Duration::from_secs(1));
        let fast = Histogram::new(&[0.000001]);
        for _ in 0..10 {
            fast.observe(Duration::from_nanos(300));
        }
        registry.register("lat_seconds", "Latency", latency);
        registry.register("fast_seconds", "Sub-microsecond latency", fast);
        let out = render(&registry);
        for line in [
            "# TYPE w_total counter",
            "w_total{rpc=\"CreateFlag\",outcome=\"ok\"} 2",
            "w_total{rpc=\"UpdateFlag\",outcome=\"aborted\"} 1",
            "lat_seconds_bucket{le=\"0.001\"} 1",
            "lat_seconds_bucket{le=\"0.01\"} 2",
            "lat_seconds_bucket{le=\"+Inf\"} 3",
            "lat_seconds_count 3",
            "lat_seconds_sum 1.0055",
            // Ten observations of 300 ns: whole microseconds would have summed to 0.
            "fast_seconds_sum 0.000003",
            "fast_seconds_count 10",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }
}
