//! flagread's Prometheus metrics: evaluations by namespace and reason (and, for the namespaces
//! an operator opts in, by flag and variant), evaluation latency, and how far the replica is
//! behind the writer (applied and head revision, lag, staleness, connected).
//!
//! # Bounding the per-flag series
//! Evaluations are counted per flag, variant and reason by lock-free atomics hung off the
//! published state (`state::FlagCounters`), so the hot path takes no lock and allocates
//! nothing. Exporting every one of them made a series per flag and variant: 30,000 flags gave a
//! 2.6 MiB scrape, and every flag created or deleted churned the series set. So at scrape time:
//! - `flagread_evaluations_total{namespace,reason}` always sums a namespace's flags: at most
//!   seven series per namespace, whatever the number of flags;
//! - `flagread_flag_evaluations_total{namespace,flag,variant,reason}` is exported only for the
//!   namespaces named in `--flag-metrics-namespaces` (`*` for all), and at most
//!   `--flag-metrics-max-series` series in all. The cap keeps the first series in (namespace,
//!   flag) order rather than the busiest: a series then stays in or out from one scrape to the
//!   next, so `rate()` over it is sound, where a top-N set would make series come and go as
//!   traffic shifts. What the cap leaves out is still in the namespace totals, and
//!   `flagread_flag_series_dropped` says how many series it left out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use flagstream::kit::metrics::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::follower::SyncStatus;
use crate::state::State;

/// Latency buckets for in-memory evaluations: 1 µs to 100 ms (evaluations are microseconds; the
/// tail shows scheduling stalls).
pub const EVAL_BUCKETS: &[f64] = &[
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
    0.01, 0.1,
];

/// Metrics owned by the service (the per-flag counters live in the state).
#[derive(Debug)]
pub struct Metrics {
    /// Time to evaluate the flags of one call (not counting the RPC around it).
    pub eval_latency: Histogram,
    /// Calls refused with RESOURCE_EXHAUSTED by the concurrency limit.
    pub shed: Counter,
    /// Calls that hit an unknown namespace (no per-flag counter to bump).
    pub unknown_namespace: Counter,
    /// `min_revision` waits open now.
    pub revision_waits: Gauge,
    /// `min_revision` calls refused because the replica's or the token's waits were all taken.
    pub revision_waits_refused: Counter,
    /// `Watch` streams open now.
    pub watch_streams: Gauge,
    /// `Watch` calls refused because the replica's or the token's streams were all taken.
    pub watch_streams_refused: Counter,
}

/// Which namespaces export per-flag series, and how many series at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagSeries {
    /// `None`: every namespace (`*`); otherwise these (empty: none).
    pub namespaces: Option<BTreeSet<String>>,
    /// Most `flagread_flag_evaluations_total` series in one scrape.
    pub max_series: usize,
}

/// Reads the replica's state and sync status at scrape time.
struct ReplicaCollector {
    state: Arc<State>,
    status: Arc<SyncStatus>,
    flags: FlagSeries,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            eval_latency: Histogram::new(EVAL_BUCKETS),
            shed: Counter::default(),
            unknown_namespace: Counter::default(),
            revision_waits: Gauge::default(),
            revision_waits_refused: Counter::default(),
            watch_streams: Gauge::default(),
            watch_streams_refused: Counter::default(),
        }
    }
}

impl FlagSeries {
    /// From `--flag-metrics-namespaces` (`*` alone means all) and `--flag-metrics-max-series`.
    pub fn new(namespaces: &[String], max_series: usize) -> FlagSeries {
        let namespaces = if namespaces.iter().any(|ns| ns == "*") {
            None
        } else {
            Some(namespaces.iter().cloned().collect())
        };
        FlagSeries {
            namespaces,
            max_series,
        }
    }

    fn exports(&self, namespace: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|set| set.contains(namespace))
    }
}

impl Metrics {
    /// Exports the service's metrics and the state's in `registry`.
    pub fn register(
        &self,
        registry: &mut Registry,
        state: Arc<State>,
        status: Arc<SyncStatus>,
        flags: FlagSeries,
    ) {
        registry.register(
            "flagread_evaluation_seconds",
            "Time to evaluate the flags of one call (one for Evaluate, all of them for batches)",
            self.eval_latency.clone(),
        );
        registry.register(
            "flagread_shed",
            "Calls refused by the concurrency limit",
            self.shed.clone(),
        );
        registry.register(
            "flagread_unknown_namespace",
            "Calls naming a namespace this replica does not hold",
            self.unknown_namespace.clone(),
        );
        registry.register(
            "flagread_revision_waits",
            "min_revision waits open",
            self.revision_waits.clone(),
        );
        registry.register(
            "flagread_revision_waits_refused",
            "min_revision calls refused because the replica's or the token's waits were all taken",
            self.revision_waits_refused.clone(),
        );
        registry.register(
            "flagread_watch_streams",
            "Watch streams open",
            self.watch_streams.clone(),
        );
        registry.register(
            "flagread_watch_streams_refused",
            "Watch calls refused because the replica's or the token's streams were all taken",
            self.watch_streams_refused.clone(),
        );
        registry.register_collector(Box::new(ReplicaCollector {
            state,
            status,
            flags,
        }));
    }
}

impl std::fmt::Debug for ReplicaCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaCollector")
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

impl Collector for ReplicaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (state, status) = (&self.state, &self.status);
        let replica = state.load();
        let applied = replica.revision;
        let head = status.head().max(applied);
        let gauges: [(&str, &str, i64); 8] = [
            (
                "flagread_applied_revision",
                "Revision of the state being served",
                applied as i64,
            ),
            (
                "flagread_head_revision",
                "The writer's head revision, as last heard",
                head as i64,
            ),
            (
                "flagread_lag_revisions",
                "Head revision minus applied revision",
                (head - applied) as i64,
            ),
            (
                "flagread_staleness_seconds",
                "Seconds since the writer was last heard from (-1: never)",
                status.staleness().map_or(-1, |s| s.as_secs() as i64),
            ),
            (
                "flagread_stuck_revision",
                "A revision from the writer this replica cannot decode or apply (0: none); it serves the one before",
                status.stuck() as i64,
            ),
            (
                "flagread_connected",
                "1 while subscribed to the writer",
                i64::from(status.connected()),
            ),
            (
                "flagread_ready",
                "1 once a full state is held (health SERVING)",
                i64::from(state.is_ready()),
            ),
            (
                "flagread_flags",
                "Flags held, over all namespaces",
                replica.flag_count() as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let counters = [
            (
                "flagread_subscriptions",
                "Subscriptions opened to the writer",
                status.subscriptions(),
            ),
            (
                "flagread_snapshots_applied",
                "Snapshots received from the writer and applied",
                status.snapshots(),
            ),
            (
                "flagread_resyncs",
                "Subscriptions ended by a gap or protocol error",
                status.resyncs(),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }

        let mut namespaces: Vec<_> = replica.namespaces.iter().collect();
        namespaces.sort_by(|a, b| a.0.cmp(b.0));
        // Namespace totals by reason, and the per-flag series of opted-in namespaces.
        let mut totals: BTreeMap<(&str, &'static str), u64> = BTreeMap::new();
        let mut per_flag: Vec<([(&str, &str); 4], u64)> = Vec::new();
        let mut dropped = 0u64;
        for (ns_key, ns) in &namespaces {
            let exported = self.flags.exports(ns_key);
            let mut flags: Vec<_> = ns.all_counters().collect();
            if exported {
                flags.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (flag, counters) in flags {
                for (variant, reason, count) in counters.iter() {
                    let reason = reason_label(reason);
                    *totals.entry((ns_key.as_str(), reason)).or_default() += count;
                    if !exported {
                        continue;
                    }
                    if per_flag.len() < self.flags.max_series {
                        per_flag.push((
                            [
                                ("namespace", ns_key.as_str()),
                                ("flag", flag),
                                ("variant", variant.unwrap_or("")),
                                ("reason", reason),
                            ],
                            count,
                        ));
                    } else {
                        dropped += 1;
                    }
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "flagread_evaluations",
            "Evaluations by namespace and reason, over all flags of the namespace",
            None,
            MetricType::Counter,
        )?;
        for ((namespace, reason), count) in &totals {
            let labels = [("namespace", *namespace), ("reason", *reason)];
            family
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(count, None)?;
        }
        let mut family = encoder.encode_descriptor(
            "flagread_flag_evaluations",
            "Evaluations by namespace, flag, variant and reason, for the namespaces in --flag-metrics-namespaces",
            None,
            MetricType::Counter,
        )?;
        for (labels, count) in &per_flag {
            family
                .encode_family(labels)?
                .encode_counter::<NoLabelSet, _, u64>(count, None)?;
        }
        let gauge = ConstGauge::new(dropped as i64);
        gauge.encode(encoder.encode_descriptor(
            "flagread_flag_series_dropped",
            "Per-flag series left out of flagread_flag_evaluations_total by --flag-metrics-max-series (still in flagread_evaluations_total)",
            None,
            gauge.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The metric label of a reason (OpenFeature's names).
fn reason_label(reason: flagstream::engine::Reason) -> &'static str {
    use flagstream::engine::Reason;
    match reason {
        Reason::Static => "STATIC",
        Reason::TargetingMatch => "TARGETING_MATCH",
        Reason::Split => "SPLIT",
        Reason::Default => "DEFAULT",
        Reason::Disabled => "DISABLED",
        Reason::PrerequisiteFailed => "PREREQUISITE_FAILED",
        Reason::Error => "ERROR",
    }
}
