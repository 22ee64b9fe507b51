//! flagwrite's Prometheus metrics: writes by RPC and outcome, write latency,
//! head revision, and each subscriber with its lag.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flagstream::kit::metrics::{CounterVec, Gauge, Histogram, LATENCY_BUCKETS, Text};

/// Every metric flagwrite exports.
pub struct Metrics {
    /// Writes by RPC and outcome (`ok`, `invalid`, `aborted`, …).
    pub writes: CounterVec,
    /// Time from a write entering the writer's batch to its acknowledgement,
    /// including the flush.
    pub write_latency: Histogram,
    /// The latest durable revision.
    pub head_revision: Gauge,
    /// Flushes (fsyncs) the writer made; writes per flush shows how well
    /// group commit works.
    pub flushes: Gauge,
    /// Connected subscribers by id, with the last revision each was sent.
    subscribers: Mutex<BTreeMap<u64, Arc<AtomicU64>>>,
    next_subscriber: AtomicU64,
}

/// Registers a subscriber while it lives; dropping it unregisters.
pub struct SubscriberGuard {
    metrics: Arc<Metrics>,
    id: u64,
    /// The last revision sent to this subscriber.
    pub sent: Arc<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            writes: CounterVec::default(),
            write_latency: Histogram::new(LATENCY_BUCKETS),
            head_revision: Gauge::default(),
            flushes: Gauge::default(),
            subscribers: Mutex::new(BTreeMap::new()),
            next_subscriber: AtomicU64::new(1),
        }
    }
}

impl Metrics {
    /// Registers a new subscriber.
    pub fn subscriber(self: &Arc<Self>) -> SubscriberGuard {
        let id = self.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let sent = Arc::new(AtomicU64::new(0));
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, sent.clone());
        SubscriberGuard {
            metrics: self.clone(),
            id,
            sent,
        }
    }

    /// The Prometheus text of every metric.
    pub fn render(&self) -> String {
        let head = self.head_revision.get();
        let mut text = Text::default();
        text.counter_vec(
            "flagwrite_writes_total",
            "Write RPCs by RPC and outcome.",
            &["rpc", "outcome"],
            &self.writes,
        );
        text.histogram(
            "flagwrite_write_duration_seconds",
            "Time to commit and flush a write, per write.",
            &self.write_latency,
        );
        text.gauge(
            "flagwrite_head_revision",
            "The latest durable revision.",
            head,
        );
        text.counter(
            "flagwrite_flushes_total",
            "Flushes to disk; each acknowledges a group of writes.",
            self.flushes.get(),
        );
        let subscribers: Vec<(Vec<String>, i64)> = self
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, sent)| {
                (
                    vec![id.to_string()],
                    head - sent.load(Ordering::Relaxed) as i64,
                )
            })
            .collect();
        text.gauge(
            "flagwrite_subscribers",
            "Connected replication subscribers.",
            subscribers.len() as i64,
        );
        text.gauge_vec(
            "flagwrite_subscriber_lag_revisions",
            "Revisions each subscriber is behind the head.",
            &["subscriber"],
            subscribers,
        );
        text.finish()
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.metrics
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}
