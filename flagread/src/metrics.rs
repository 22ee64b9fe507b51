//! flagread's Prometheus metrics: evaluations by flag, variant and reason (atomic counters hung
//! off the published state, so the hot path takes no lock), evaluation latency, and how far the
//! replica is behind the writer (applied and head revision, lag, staleness, connected).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flagstream::kit::metrics::{Histogram, Text};

use crate::follower::SyncStatus;
use crate::state::State;

/// Latency buckets for in-memory evaluations: 1 µs to 100 ms (evaluations are microseconds; the
/// tail shows scheduling stalls).
pub const EVAL_BUCKETS: &[f64] = &[
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
    0.01, 0.1,
];

/// Metrics owned by the service (the per-flag counters live in the state).
pub struct Metrics {
    /// Time to evaluate the flags of one call (not counting the RPC around it).
    pub eval_latency: Histogram,
    /// Calls refused with RESOURCE_EXHAUSTED by the concurrency limit.
    pub shed: AtomicU64,
    /// Calls that hit an unknown namespace (no per-flag counter to bump).
    pub unknown_namespace: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            eval_latency: Histogram::new(EVAL_BUCKETS),
            shed: AtomicU64::new(0),
            unknown_namespace: AtomicU64::new(0),
        }
    }
}

/// Renders every metric of a replica in the Prometheus text format.
pub fn render(state: &State, status: &SyncStatus, metrics: &Metrics) -> String {
    let replica = state.load();
    let applied = replica.revision;
    let head = status.head().max(applied);
    let mut text = Text::default();
    text.gauge(
        "flagread_applied_revision",
        "Revision of the state being served.",
        applied as i64,
    );
    text.gauge(
        "flagread_head_revision",
        "The writer's head revision, as last heard.",
        head as i64,
    );
    text.gauge(
        "flagread_lag_revisions",
        "Head revision minus applied revision.",
        (head - applied) as i64,
    );
    text.gauge(
        "flagread_staleness_seconds",
        "Seconds since the writer was last heard from (-1: never).",
        status.staleness().map_or(-1, |s| s.as_secs() as i64),
    );
    text.gauge(
        "flagread_stuck_revision",
        "A revision from the writer this replica cannot decode or apply (0: none); it serves the one before.",
        status.stuck() as i64,
    );
    text.gauge(
        "flagread_connected",
        "1 while subscribed to the writer.",
        i64::from(status.connected()),
    );
    text.gauge(
        "flagread_ready",
        "1 once a full state is held (health SERVING).",
        i64::from(state.is_ready()),
    );
    text.gauge(
        "flagread_flags",
        "Flags held, over all namespaces.",
        replica.flag_count() as i64,
    );
    text.histogram(
        "flagread_evaluation_seconds",
        "Time to evaluate the flags of one call (one for Evaluate, all of them for batches).",
        &metrics.eval_latency,
    );
    let counters = [
        (
            "flagread_subscriptions_total",
            "Subscriptions opened to the writer.",
            status.subscriptions(),
        ),
        (
            "flagread_snapshots_applied_total",
            "Snapshots received from the writer and applied.",
            status.snapshots(),
        ),
        (
            "flagread_resyncs_total",
            "Subscriptions ended by a gap or protocol error.",
            status.resyncs(),
        ),
        (
            "flagread_shed_total",
            "Calls refused by the concurrency limit.",
            metrics.shed.load(Ordering::Relaxed),
        ),
        (
            "flagread_unknown_namespace_total",
            "Calls naming a namespace this replica does not hold.",
            metrics.unknown_namespace.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        text.counter(name, help, value as i64);
    }
    let mut namespaces: Vec<_> = replica.namespaces.iter().collect();
    namespaces.sort_by(|a, b| a.0.cmp(b.0));
    let series = namespaces.into_iter().flat_map(|(ns_key, ns)| {
        let mut flags: Vec<_> = ns.all_counters().collect();
        flags.sort_by(|a, b| a.0.cmp(b.0));
        flags.into_iter().flat_map(move |(flag, counters)| {
            counters.iter().map(move |(variant, reason, count)| {
                (
                    [
                        ns_key.as_str(),
                        flag,
                        variant.unwrap_or(""),
                        reason_label(reason),
                    ],
                    count,
                )
            })
        })
    });
    text.counter_series(
        "flagread_evaluations_total",
        "Evaluations by namespace, flag, variant and reason.",
        &["namespace", "flag", "variant", "reason"],
        series,
    );
    text.finish()
}

/// A render function for `kit::metrics::serve`.
pub fn renderer(
    state: Arc<State>,
    status: Arc<SyncStatus>,
    metrics: Arc<Metrics>,
) -> Arc<dyn Fn() -> String + Send + Sync> {
    Arc::new(move || render(&state, &status, &metrics))
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
