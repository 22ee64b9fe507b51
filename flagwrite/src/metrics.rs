//! flagwrite's Prometheus metrics: writes by RPC and outcome, write latency, head revision,
//! flushes, the subscribers with the lag of the furthest behind, and the snapshots built.
//!
//! Subscribers carry no per-subscriber label: one series per connection churned on every
//! reconnect, so the count and the largest lag are computed at scrape time instead.

use std::sync::Arc;

use flagstream::kit::metrics::{Histogram, LATENCY_BUCKETS};
use flagstream::kit::replication::Subscribers;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// Every metric flagwrite updates; [`Metrics::register`] exports them.
#[derive(Debug)]
pub struct Metrics {
    /// Writes by RPC and outcome (`ok`, `invalid`, `aborted`, …).
    writes: Family<WriteLabels, Counter>,
    /// Time from a write entering the writer's batch to its acknowledgement,
    /// including the flush.
    pub write_latency: Histogram,
    /// The latest durable revision.
    pub head_revision: Gauge,
    /// Flushes (fsyncs) the writer made; writes per flush shows how well
    /// group commit works.
    pub flushes: Counter,
    /// Connected subscribers, with the last revision each was sent, and the snapshots built.
    pub subscribers: Arc<Subscribers>,
}

/// The labels of `flagwrite_writes_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    rpc: &'static str,
    outcome: &'static str,
}

/// Reads the subscribers at scrape time.
#[derive(Debug)]
struct SubscriberCollector(Arc<Metrics>);

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            writes: Family::default(),
            write_latency: Histogram::new(LATENCY_BUCKETS),
            head_revision: Gauge::default(),
            flushes: Counter::default(),
            subscribers: Arc::default(),
        }
    }
}

impl Metrics {
    /// Exports every metric in `registry`.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "flagwrite_writes",
            "Write RPCs by RPC and outcome",
            self.writes.clone(),
        );
        registry.register(
            "flagwrite_write_duration_seconds",
            "Time to commit and flush a write, per write",
            self.write_latency.clone(),
        );
        registry.register(
            "flagwrite_head_revision",
            "The latest durable revision",
            self.head_revision.clone(),
        );
        registry.register(
            "flagwrite_flushes",
            "Flushes to disk; each acknowledges a group of writes",
            self.flushes.clone(),
        );
        registry.register_collector(Box::new(SubscriberCollector(self.clone())));
    }

    /// Counts one write RPC of `rpc` that ended with `outcome`.
    pub fn write(&self, rpc: &'static str, outcome: &'static str) {
        self.writes
            .get_or_create(&WriteLabels { rpc, outcome })
            .inc();
    }
}

impl Collector for SubscriberCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let head = self.0.head_revision.get();
        let (count, max_lag) = self.0.subscribers.count_and_lag(head.max(0) as u64);
        let (count, max_lag) = (count as i64, max_lag as i64);
        let built = self.0.subscribers.snapshots_built();
        for (name, help, value) in [
            (
                "flagwrite_subscribers",
                "Connected replication subscribers",
                count,
            ),
            (
                "flagwrite_subscriber_lag_revisions",
                "Revisions the subscriber furthest behind is behind the head (0 without subscribers)",
                max_lag,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let counter = ConstCounter::new(built);
        counter.encode(encoder.encode_descriptor(
            "flagwrite_snapshots_built",
            "Snapshots built for subscribers; subscribers asking at about the same time share one",
            None,
            counter.metric_type(),
        )?)?;
        Ok(())
    }
}
