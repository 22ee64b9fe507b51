//! The replica state: every followed namespace compiled into an `engine::FlagSet`, published
//! whole behind `arc-swap` so evaluations never lock and never see half of a change.
//!
//! Only the follower (or the snapshot file loader) writes here, one change at a time; every
//! write builds the next [`Replica`] aside (copy-on-write: a `FlagSet` clone shares its compiled
//! flags, so only the flags a change touches are recompiled) and publishes it with one atomic
//! pointer swap, then announces the new revision on a `watch` channel (for `min_revision` waits)
//! and the changed flag keys on a `broadcast` channel (for `Watch` subscribers).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use flagstream::convert::EncodedFlag;
use flagstream::engine::{CompiledFlag, FlagSet, Reason, ShardedMap};
use flagstream::model;
use tokio::sync::{broadcast, watch};

/// How many applied changes a slow `Watch` subscriber may fall behind before it is told to
/// refresh everything instead (see [`Applied::full_refresh`]).
const CHANGE_BACKLOG: usize = 1024;

/// The shared replica state. Cheap to share behind an `Arc`; readers call [`State::load`].
pub struct State {
    /// The published state. Readers `load` it without locking; the writer swaps in a new one.
    current: ArcSwap<Replica>,
    /// Serializes writers so that two applies never race on building the next state. Readers
    /// never touch it.
    write: Mutex<()>,
    /// The applied revision, for `min_revision` waits and staleness metrics.
    revision: watch::Sender<u64>,
    /// True once a full state is held (health turns SERVING).
    ready: watch::Sender<bool>,
    /// One message per applied change, for `Watch` subscribers.
    changes: broadcast::Sender<Arc<Applied>>,
    /// Namespaces this replica serves; `None` means all. Objects of other namespaces are ignored
    /// even if the writer sends them.
    filter: Option<BTreeSet<String>>,
}

/// One immutable, complete state of the replica at one revision.
#[derive(Default)]
pub struct Replica {
    /// The revision every namespace here reflects.
    pub revision: u64,
    /// Whose history `revision` is, and where in it: the follower resumes only into the same
    /// history (see `flagstream::digest`).
    pub history: History,
    /// True once a full state (a snapshot) was installed; evaluations wait for it.
    pub ready: bool,
    /// The namespaces followed, by key. Each is behind an `Arc` so that a change copies only the
    /// namespaces it touches.
    pub namespaces: HashMap<String, Arc<NamespaceState>>,
}

/// A position in the writer's history: the store's history identity and the position (hash
/// chain) at the replica's revision. Empty before any state is held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct History {
    pub id: String,
    pub chain: Vec<u8>,
}

/// One namespace of a [`Replica`].
#[derive(Clone)]
pub struct NamespaceState {
    /// The namespace's own record (description, stamp).
    pub namespace: model::Namespace,
    /// Its flags and segments, compiled.
    pub flags: FlagSet,
    /// Evaluation counters per flag key, shared by every state that holds the same flag with the
    /// same variants, so the hot path counts with one atomic add and no lock. A shard of the map
    /// is copied only when one of its flags is created or deleted or its variants change.
    counters: ShardedMap<String, Arc<FlagCounters>>,
    /// For each flag key, the flags that list it as a prerequisite, so that a change can name
    /// the flags whose results it may change without scanning the namespace. Sharded like the
    /// counters, so a prerequisite edit copies 1/64 of the index.
    dependents: ShardedMap<String, BTreeSet<String>>,
}

/// What the replica keeps with each compiled flag (in [`CompiledFlag::attachment`]), built on
/// the flag's first evaluation so that a call finds it without a lookup by key. An edit compiles a
/// new flag, so these always describe the version evaluated.
pub struct FlagExtras {
    /// The flag's counters (shared with its other versions that have the same variants).
    pub counters: Option<Arc<FlagCounters>>,
    /// The parts of its results that do not depend on the evaluation, encoded (for batches).
    pub encoded: EncodedFlag,
}

/// Lock-free evaluation counters of one flag: one per (variant, reason), plus one row for
/// evaluations that served no variant.
pub struct FlagCounters {
    /// A hash of the variant names in declaration order, to tell without the names whether an
    /// edited flag can keep these counters.
    variants_hash: u64,
    /// The counters, allocated on the flag's first evaluation: a replica holding 100,000 flags
    /// evaluates few of them, and allocating every flag's counters up front cost about 30 MB.
    /// After the first evaluation, reading it is one atomic load, so the hot path takes no lock.
    counts: OnceLock<Counts>,
}

/// The counters of a flag that was evaluated at least once.
struct Counts {
    /// Variant names in declaration order; row `i` counts variant `i`, the last row "no variant".
    variants: Box<[String]>,
    /// One copy of the `(variants.len() + 1) * REASONS.len()` counters per stripe (see
    /// [`thread_stripe`]), each allocated when a thread of its stripe first counts this flag. A
    /// count is the sum over the copies. Threads evaluating the same flags at once (every
    /// `EvaluateAll` of a namespace, every `Evaluate` of a hot flag) then add to counters of
    /// their own instead of moving one cache line between cores on every evaluation.
    stripes: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

/// What one applied change did, as announced to `Watch` subscribers.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The applied revision after the change.
    pub revision: u64,
    /// Keys of the flags whose definition or result may have changed, by namespace, sorted.
    pub changed: BTreeMap<String, Vec<String>>,
    /// The whole state was replaced (a snapshot): subscribers should refresh everything.
    pub full_refresh: bool,
}

/// One committed write, in model types: what the follower hands to [`State::apply_change`].
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The revision the write committed; must be the applied revision + 1.
    pub revision: u64,
    /// The history position after it.
    pub chain: Vec<u8>,
    /// The objects it put or deleted, applied together.
    pub deltas: Vec<Delta>,
}

/// One object put or deleted.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    PutNamespace(model::Namespace),
    DeleteNamespace(String),
    PutFlag(model::Flag),
    DeleteFlag { namespace: String, key: String },
    PutSegment(model::Segment),
    DeleteSegment { namespace: String, key: String },
}

/// A full state being received (a snapshot between SnapshotBegin and SnapshotEnd), kept aside
/// until it is complete.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SnapshotBuilder {
    /// The revision the snapshot is taken at.
    pub revision: u64,
    /// The history and position at `revision`.
    pub history: History,
    /// The namespaces it covers; `None` means all.
    pub covers: Option<BTreeSet<String>>,
    pub namespaces: Vec<model::Namespace>,
    pub flags: Vec<model::Flag>,
    pub segments: Vec<model::Segment>,
}

/// Why a change or snapshot could not be applied. Nothing is published when one is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    /// A change arrived whose revision is not the applied revision + 1.
    #[error("change {got} does not follow the applied revision {applied}")]
    OutOfOrder { applied: u64, got: u64 },
    /// A change arrived before any full state was held.
    #[error("change {got} arrived before a full state")]
    NoFullState { got: u64 },
}

/// Reasons in counter order; the index of a reason is its position here.
pub const REASONS: [Reason; 7] = [
    Reason::Static,
    Reason::TargetingMatch,
    Reason::Split,
    Reason::Default,
    Reason::Disabled,
    Reason::PrerequisiteFailed,
    Reason::Error,
];

impl State {
    /// An empty state (revision 0, not ready) serving `filter` (`None` = every namespace).
    pub fn new(filter: Option<BTreeSet<String>>) -> State {
        State {
            current: ArcSwap::from_pointee(Replica::default()),
            write: Mutex::new(()),
            revision: watch::channel(0).0,
            ready: watch::channel(false).0,
            changes: broadcast::channel(CHANGE_BACKLOG).0,
            filter,
        }
    }

    /// The current state. Never blocks; the returned `Arc` stays valid (and unchanged) however
    /// many changes are applied meanwhile.
    pub fn load(&self) -> Arc<Replica> {
        self.current.load_full()
    }

    /// The current state, for the length of one call: like [`State::load`], but without
    /// touching the reference count that every core shares.
    pub fn peek(&self) -> arc_swap::Guard<Arc<Replica>> {
        self.current.load()
    }

    /// The applied revision.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Whether a full state is held. Lock-free (it is part of the published state).
    pub fn is_ready(&self) -> bool {
        self.current.load().ready
    }

    /// Follows the applied revision.
    pub fn subscribe_revision(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Follows readiness (false until the first full state).
    pub fn subscribe_ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Follows applied changes. Subscribe before reading the current revision, so that no
    /// change falls between the two.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Arc<Applied>> {
        self.changes.subscribe()
    }

    /// Whether this replica serves `namespace` at all (it may not exist yet).
    pub fn follows(&self, namespace: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| f.contains(namespace))
    }

    /// The namespaces this replica serves; `None` means all.
    pub fn filter(&self) -> Option<&BTreeSet<String>> {
        self.filter.as_ref()
    }

    /// The namespaces this replica was asked to follow, for the subscription request; empty
    /// means all.
    pub fn followed(&self) -> Vec<String> {
        self.filter.iter().flatten().cloned().collect()
    }

    /// Waits until the applied revision is at least `revision`; returns the applied revision.
    /// The caller bounds the wait (with the call's deadline).
    pub async fn wait_for_revision(&self, revision: u64) -> u64 {
        let mut rx = self.revision.subscribe();
        // `wait_for` only fails when the sender is dropped, and `self` owns the sender.

        match rx.wait_for(|applied| *applied >= revision).await {
            Ok(applied) => *applied,
            Err(_) => self.revision(),
        }
    }

    /// Replaces the whole state with a complete snapshot, compiled aside and published in one
    /// swap. Counters of flags that survive unchanged in their variants keep counting.
    pub fn install(&self, snapshot: SnapshotBuilder) {
        let _writer = self
            .write
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = self.current.load_full();
        // The writer is the source of truth: a snapshot older than the state held (a writer
        // restored from a backup) still replaces it, loudly, rather than leaving the replica
        // stuck on a history the writer no longer has.
        if snapshot.revision < old.revision {
            tracing::warn!(
                applied = old.revision,
                snapshot = snapshot.revision,
                "the writer sent a snapshot older than the state held; replacing it"
            );
        }
        let mut namespaces: HashMap<String, NamespaceState> = HashMap::new();
        for ns in snapshot.namespaces {
            if self.follows(&ns.key) {
                namespaces.insert(ns.key.clone(), NamespaceState::empty(ns));
            }
        }
        // Segments first, so each flag compiles once against the segments it references.
        for segment in snapshot.segments {
            if let Some(ns) = self.namespace_for(&mut namespaces, &segment.namespace) {
                ns.flags.upsert_segment(segment);
            }
        }
        for flag in snapshot.flags {
            let Some(ns) = self.namespace_for(&mut namespaces, &flag.namespace) else {
                continue;
            };
            let previous = old
                .namespaces
                .get(&flag.namespace)
                .and_then(|o| o.counters.get(&flag.key));
            let entry = FlagCounters::reuse_or_new(previous, &flag);
            ns.counters.insert(flag.key.clone(), entry);
            ns.track_prerequisites(&flag.key, &flag.prerequisites);
            ns.flags.upsert_flag(flag);
        }
        let namespaces = namespaces
            .into_iter()
            .map(|(key, ns)| (key, Arc::new(ns)))
            .collect();
        let replica = Replica {
            revision: snapshot.revision,
            history: snapshot.history,
            ready: true,
            namespaces,
        };
        self.publish(
            replica,
            Applied {
                revision: snapshot.revision,
                changed: BTreeMap::new(),
                full_refresh: true,
            },
        );
        self.ready.send_replace(true);
    }

    /// Applies one change (all its deltas) and publishes the result in one swap. Only the flags
    /// the change touches are recompiled (and, for a segment change, the flags using it).
    pub fn apply_change(&self, change: Change) -> Result<Arc<Applied>, ApplyError> {
        let _writer = self
            .write
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = self.current.load_full();
        if !self.is_ready() {
            return Err(ApplyError::NoFullState {
                got: change.revision,
            });
        }
        if change.revision != old.revision + 1 {
            return Err(ApplyError::OutOfOrder {
                applied: old.revision,
                got: change.revision,
            });
        }
        // The namespaces this change touches, copied out of the old state (cheap: FlagSet clones
        // share compiled flags) and edited; `None` marks a deleted namespace.
        let mut touched: HashMap<String, Option<NamespaceState>> = HashMap::new();
        let mut changed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for delta in change.deltas {
            let namespace = delta.namespace().to_string();
            if !self.follows(&namespace) {
                continue;
            }
            let slot = touched
                .entry(namespace.clone())
                .or_insert_with(|| old.namespaces.get(&namespace).map(|ns| (**ns).clone()));
            let keys = changed.entry(namespace.clone()).or_default();
            match delta {
                Delta::PutNamespace(record) => match slot {
                    Some(ns) => ns.namespace = record,
                    None => *slot = Some(NamespaceState::empty(record)),
                },
                Delta::DeleteNamespace(_) => {
                    if let Some(ns) = slot.take() {
                        keys.extend(ns.flags.flags().map(|f| f.key().to_string()));
                    }
                }
                Delta::PutFlag(flag) => {
                    let ns =
                        slot.get_or_insert_with(|| NamespaceState::empty(implicit(&namespace)));
                    keys.insert(flag.key.clone());
                    ns.put_counters(&flag);
                    ns.track_prerequisites(&flag.key, &flag.prerequisites);
                    ns.flags.upsert_flag(flag);
                }
                Delta::DeleteFlag { key, .. } => {
                    if let Some(ns) = slot {
                        ns.track_prerequisites(&key, &[]);
                        if ns.flags.remove_flag(&key) {
                            ns.counters.remove(&key);
                        }
                        keys.insert(key);
                    }
                }
                Delta::PutSegment(segment) => {
                    let ns =
                        slot.get_or_insert_with(|| NamespaceState::empty(implicit(&namespace)));
                    keys.extend(ns.users_of_segment(&segment.key));
                    ns.flags.upsert_segment(segment);
                }
                Delta::DeleteSegment { key, .. } => {
                    if let Some(ns) = slot {
                        keys.extend(ns.users_of_segment(&key));
                        ns.flags.remove_segment(&key);
                    }
                }
            }
        }
        let mut namespaces = old.namespaces.clone();
        for (key, ns) in touched {
            match ns {
                Some(ns) => namespaces.insert(key, Arc::new(ns)),
                None => namespaces.remove(&key),
            };
        }
        // A flag whose prerequisite changed may now evaluate differently too.
        for (namespace, keys) in changed.iter_mut() {
            if let Some(ns) = namespaces.get(namespace) {
                ns.add_dependents(keys);
            }
        }
        let applied = Applied {
            revision: change.revision,
            changed: changed
                .into_iter()
                .filter(|(_, keys)| !keys.is_empty())
                .map(|(ns, keys)| (ns, keys.into_iter().collect()))
                .collect(),
            full_refresh: false,
        };
        let replica = Replica {
            revision: change.revision,
            history: History {
                id: old.history.id.clone(),
                chain: change.chain,
            },
            ready: true,
            namespaces,
        };
        Ok(self.publish(replica, applied))
    }

    /// Swaps in `replica` and announces it, in that order, so that anyone woken by the
    /// announcement already sees the new state.
    fn publish(&self, replica: Replica, applied: Applied) -> Arc<Applied> {
        let revision = replica.revision;
        self.current.store(Arc::new(replica));
        self.revision.send_replace(revision);
        let applied = Arc::new(applied);
        // No subscribers is fine: nobody is watching.
        let _ = self.changes.send(applied.clone());
        applied
    }

    /// The namespace `key` of a snapshot being built, if followed and present.
    fn namespace_for<'a>(
        &self,
        namespaces: &'a mut HashMap<String, NamespaceState>,
        key: &str,
    ) -> Option<&'a mut NamespaceState> {
        if !self.follows(key) {
            return None;
        }
        Some(
            namespaces
                .entry(key.to_string())
                .or_insert_with(|| NamespaceState::empty(implicit(key))),
        )
    }
}

/// A namespace record for objects that arrive before (or without) their namespace, so that a
/// well-formed flag is never dropped.
fn implicit(key: &str) -> model::Namespace {
    model::Namespace {
        key: key.to_string(),
        ..Default::default()
    }
}

impl Replica {
    /// Every object of the state as a snapshot, for the snapshot file.
    pub fn to_snapshot(&self) -> SnapshotBuilder {
        let mut snapshot = SnapshotBuilder {
            revision: self.revision,
            history: self.history.clone(),
            ..Default::default()
        };
        let mut keys: Vec<&String> = self.namespaces.keys().collect();
        keys.sort();
        for key in keys {
            let ns = &self.namespaces[key];
            snapshot.namespaces.push(ns.namespace.clone());
            snapshot.segments.extend(ns.flags.segments().cloned());
            snapshot
                .flags
                .extend(ns.flags.flags().map(|f| f.source().clone()));
        }
        snapshot
    }

    /// Number of flags held, over all namespaces.
    pub fn flag_count(&self) -> usize {
        self.namespaces.values().map(|ns| ns.flags.len()).sum()
    }
}

impl NamespaceState {
    fn empty(namespace: model::Namespace) -> NamespaceState {
        NamespaceState {
            namespace,
            flags: FlagSet::default(),
            counters: ShardedMap::default(),
            dependents: ShardedMap::default(),
        }
    }

    /// The counters of flag `key`, if it exists.
    pub fn counters(&self, key: &str) -> Option<&FlagCounters> {
        self.counters.get(key).map(|c| &**c)
    }

    /// The extras of `flag`, one of this namespace's flags; built on the first call for this
    /// version of the flag. `None` only if something else was attached to it first.
    pub fn extras<'f>(&self, flag: &'f CompiledFlag) -> Option<&'f FlagExtras> {
        flag.attachment(|flag| FlagExtras {
            counters: self.counters.get(flag.key()).cloned(),
            encoded: EncodedFlag::new(flag),
        })
    }

    /// Every flag's counters, for rendering metrics.
    pub fn all_counters(&self) -> impl Iterator<Item = (&str, &FlagCounters)> {
        self.counters.iter().map(|(k, c)| (k.as_str(), &**c))
    }

    /// Makes sure `flag` has counters matching its variants, copying the counter map only when
    /// the flag is new or its variants changed.
    fn put_counters(&mut self, flag: &model::Flag) {
        let existing = self.counters.get(&flag.key);
        if existing.is_some_and(|c| c.matches(flag)) {
            return;
        }
        let fresh = FlagCounters::reuse_or_new(existing, flag);
        self.counters.insert(flag.key.clone(), fresh);
    }

    /// Keys of the flags with a rule that references segment `key`.
    fn users_of_segment(&self, key: &str) -> Vec<String> {
        self.flags
            .flags()
            .filter(|f| f.uses_segment(key))
            .map(|f| f.key().to_string())
            .collect()
    }

    /// Adds to `keys` every flag that (transitively) lists one of `keys` as a prerequisite.
    fn add_dependents(&self, keys: &mut BTreeSet<String>) {
        if self.dependents.is_empty() {
            return;
        }
        let mut pending: Vec<String> = keys.iter().cloned().collect();
        while let Some(key) = pending.pop() {
            for child in self.dependents.get(&key).into_iter().flatten() {
                if keys.insert(child.clone()) {
                    pending.push(child.clone());
                }
            }
        }
    }

    /// Records that flag `key` now has `prerequisites` (none when deleted), replacing what the
    /// stored flag had. Copies a shard of the index only when it changes.
    fn track_prerequisites(&mut self, key: &str, prerequisites: &[model::Prerequisite]) {
        let old: Vec<&str> = self
            .flags
            .get(key)
            .map(|f| {
                f.source()
                    .prerequisites
                    .iter()
                    .map(|p| p.flag.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let new: Vec<&str> = prerequisites.iter().map(|p| p.flag.as_str()).collect();
        if old == new {
            return;
        }
        for parent in old {
            if let Some(children) = self.dependents.get_mut(parent) {
                children.remove(key);
                if children.is_empty() {
                    self.dependents.remove(parent);
                }
            }
        }
        for parent in new {
            self.dependents
                .get_or_default(parent)
                .insert(key.to_string());
        }
    }
}

impl FlagCounters {
    /// Counters for `flag`, allocated on its first evaluation.
    fn new(flag: &model::Flag) -> FlagCounters {
        FlagCounters {
            variants_hash: variants_hash(flag),
            counts: OnceLock::new(),
        }
    }

    /// The previous counters when the variants are the same (so counts keep growing across
    /// edits), otherwise new counters carrying over the counts of variants that remain.
    fn reuse_or_new(previous: Option<&Arc<FlagCounters>>, flag: &model::Flag) -> Arc<FlagCounters> {
        match previous {
            Some(previous) if previous.matches(flag) => previous.clone(),
            Some(previous) if previous.counts.get().is_some() => {
                let fresh = Counts::new(flag);
                for (variant, reason, count) in previous.iter() {
                    let row = match variant {
                        None => Some(fresh.variants.len()),
                        Some(v) => fresh.variants.iter().position(|n| n == v),
                    };
                    if let Some(row) = row {
                        fresh.stripe(0)[row * REASONS.len() + reason_index(reason)]
                            .store(count, Ordering::Relaxed);
                    }
                }
                Arc::new(FlagCounters {
                    variants_hash: variants_hash(flag),
                    counts: OnceLock::from(fresh),
                })
            }
            _ => Arc::new(FlagCounters::new(flag)),
        }
    }

    fn matches(&self, flag: &model::Flag) -> bool {
        self.variants_hash == variants_hash(flag)
    }

    /// Counts one evaluation of `flag` (the flag these counters belong to) that served its
    /// variant number `variant`: one relaxed atomic add to this thread's copy, no lock; allocates
    /// only on the first evaluation of the flag by a thread of each stripe.
    pub fn record(&self, flag: &model::Flag, variant: Option<usize>, reason: Reason) {
        let counts = self.counts.get_or_init(|| Counts::new(flag));
        // Every flag sharing these counters has the same variant names in the same order.
        let row = variant
            .filter(|&i| i < counts.variants.len())
            .unwrap_or(counts.variants.len());
        counts.stripe(thread_stripe())[row * REASONS.len() + reason_index(reason)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Every non-zero counter as (variant, reason, count); variant `None` means none was served.
    pub fn iter(&self) -> impl Iterator<Item = (Option<&str>, Reason, u64)> + '_ {
        let counts = self.counts.get();
        counts
            .into_iter()
            .flat_map(|c| (0..c.cells()).map(move |i| (c, i)))
            .filter_map(|(c, i)| {
                let count = c.total(i);
                if count == 0 {
                    return None;
                }
                let row = i / REASONS.len();
                let variant = c.variants.get(row).map(String::as_str);
                Some((variant, REASONS[i % REASONS.len()], count))
            })
    }
}

impl Counts {
    /// Counters for the variants of `flag`, no stripe allocated yet.
    fn new(flag: &model::Flag) -> Counts {
        Counts {
            variants: flag.variants.iter().map(|v| v.name.clone()).collect(),
            stripes: (0..stripes()).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Counters per stripe.
    fn cells(&self) -> usize {
        (self.variants.len() + 1) * REASONS.len()
    }

    /// The copy of stripe `stripe`, allocated zeroed on first use.
    fn stripe(&self, stripe: usize) -> &[AtomicU64] {
        self.stripes[stripe % self.stripes.len()]
            .get_or_init(|| (0..self.cells()).map(|_| AtomicU64::new(0)).collect())
    }

    /// Counter `cell` summed over the stripes.
    fn total(&self, cell: usize) -> u64 {
        self.stripes
            .iter()
            .filter_map(OnceLock::get)
            .map(|copy| copy[cell].load(Ordering::Relaxed))
            .sum()
    }
}

/// How many copies of a flag's counters threads spread over: one per core, at most
/// [`MAX_STRIPES`]. Each copy of a flag with two variants is about 190 bytes, so a replica
/// whose 100,000 flags are all evaluated on every core holds ~76 MB of counters with 4 copies
/// (~19 MB with one); past 4 cores, threads share copies rather than grow that further.
fn stripes() -> usize {
    static STRIPES: OnceLock<usize> = OnceLock::new();
    *STRIPES.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, MAX_STRIPES)
    })
}

const MAX_STRIPES: usize = 4;

/// This thread's stripe: threads are numbered as they first count, round robin over the
/// stripes, so the runtime's worker threads (started together) get different ones.
fn thread_stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % stripes();
    }
    STRIPE.with(|stripe| *stripe)
}

/// A hash of `flag`'s variant names in declaration order. Two states share a flag's counters
/// only when the hashes are equal, so counters lazily allocated from either state's flag get
/// the same rows.
fn variants_hash(flag: &model::Flag) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    for variant in &flag.variants {
        variant.name.hash(&mut hasher);
    }
    flag.variants.len().hash(&mut hasher);
    hasher.finish()
}

/// The position of `reason` in [`REASONS`].
pub fn reason_index(reason: Reason) -> usize {
    match reason {
        Reason::Static => 0,
        Reason::TargetingMatch => 1,
        Reason::Split => 2,
        Reason::Default => 3,
        Reason::Disabled => 4,
        Reason::PrerequisiteFailed => 5,
        Reason::Error => 6,
    }
}

impl Delta {
    /// The namespace the object belongs to.
    pub fn namespace(&self) -> &str {
        match self {
            Delta::PutNamespace(ns) => &ns.key,
            Delta::DeleteNamespace(key) => key,
            Delta::PutFlag(flag) => &flag.namespace,
            Delta::DeleteFlag { namespace, .. } => namespace,
            Delta::PutSegment(segment) => &segment.namespace,
            Delta::DeleteSegment { namespace, .. } => namespace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(ns: &str, key: &str, variants: &[&str]) -> model::Flag {
        model::Flag {
            namespace: ns.into(),
            key: key.into(),
            description: String::new(),
            flag_type: model::FlagType::Boolean,
            variants: variants
                .iter()
                .map(|v| model::Variant {
                    name: v.to_string(),
                    value: model::Value::Bool(true),
                    description: String::new(),
                })
                .collect(),
            enabled: true,
            disabled_variant: variants[0].into(),
            default_variant: variants[0].into(),
            rules: vec![],
            prerequisites: vec![],
            tags: vec![],
            metadata: model::Metadata::new(),
            stamp: model::Stamp::default(),
        }
    }

    fn with_segment(mut f: model::Flag, segment: &str) -> model::Flag {
        f.rules.push(model::Rule {
            name: String::new(),
            constraints: vec![],
            segments: vec![segment.into()],
            rollout: None,
            serve: model::Serve::Variant(f.variants[0].name.clone()),
        });
        f
    }

    fn with_prerequisite(mut f: model::Flag, parent: &str) -> model::Flag {
        f.prerequisites.push(model::Prerequisite {
            flag: parent.into(),
            expect_off: false,
            variants: vec![],
        });
        f
    }

    fn segment(ns: &str, key: &str) -> model::Segment {
        model::Segment {
            namespace: ns.into(),
            key: key.into(),
            description: String::new(),
            constraints: vec![],
            stamp: model::Stamp::default(),
        }
    }

    /// A state at revision 1 holding namespace `prod` with flags a (uses segment s), b (needs
    /// a), c (needs b), d, and namespace `dev` with flag e.
    fn base() -> State {
        let state = State::new(None);
        let flags = vec![
            with_segment(flag("prod", "a", &["on"]), "s"),
            with_prerequisite(flag("prod", "b", &["on"]), "a"),
            with_prerequisite(flag("prod", "c", &["on"]), "b"),
            flag("prod", "d", &["on"]),
            flag("dev", "e", &["on"]),
        ];
        let namespaces = vec![
            model::Namespace {
                key: "prod".into(),
                ..Default::default()
            },
            model::Namespace {
                key: "dev".into(),
                ..Default::default()
            },
        ];
        state.install(SnapshotBuilder {
            revision: 1,
            namespaces,
            flags,
            segments: vec![segment("prod", "s")],
            ..Default::default()
        });
        state
    }

    /// Applies `deltas` as revision 2 and compares the announced changed keys.
    fn check(deltas: Vec<Delta>, expected: &[(&str, &[&str])]) {
        let state = base();
        let applied = state
            .apply_change(Change {
                chain: Vec::new(),
                revision: 2,
                deltas,
            })
            .unwrap();
        let expected: BTreeMap<String, Vec<String>> = expected
            .iter()
            .map(|(ns, keys)| (ns.to_string(), keys.iter().map(|k| k.to_string()).collect()))
            .collect();
        assert_eq!(applied.changed, expected);
        assert_eq!((applied.revision, state.revision()), (2, 2));
    }

    #[test]
    fn changed_flags_include_segment_users_and_dependents() {
        check(
            vec![Delta::PutFlag(flag("prod", "d", &["on"]))],
            &[("prod", &["d"])],
        );
        check(
            vec![Delta::PutFlag(flag("prod", "a", &["on"]))],
            &[("prod", &["a", "b", "c"])],
        );
        check(
            vec![Delta::PutSegment(segment("prod", "s"))],
            &[("prod", &["a", "b", "c"])],
        );
        check(
            vec![Delta::DeleteFlag {
                namespace: "prod".into(),
                key: "c".into(),
            }],
            &[("prod", &["c"])],
        );
        check(
            vec![Delta::DeleteNamespace("dev".into())],
            &[("dev", &["e"])],
        );
        check(
            vec![
                Delta::PutFlag(flag("dev", "f", &["on"])),
                Delta::PutFlag(flag("new", "g", &["on"])),
            ],
            &[("dev", &["f"]), ("new", &["g"])],
        );
        check(
            vec![Delta::PutNamespace(model::Namespace {
                key: "dev".into(),
                ..Default::default()
            })],
            &[],
        );
    }

    #[test]
    fn dependents_follow_prerequisite_edits() {
        let state = base();
        let put = |revision, flag| Change {
            chain: Vec::new(),
            revision,
            deltas: vec![Delta::PutFlag(flag)],
        };
        // c no longer needs b; d starts to need a.
        state
            .apply_change(put(2, flag("prod", "c", &["on"])))
            .unwrap();
        state
            .apply_change(put(3, with_prerequisite(flag("prod", "d", &["on"]), "a")))
            .unwrap();
        let applied = state
            .apply_change(put(4, flag("prod", "b", &["on"])))
            .unwrap();
        assert_eq!(applied.changed["prod"], vec!["b".to_string()]);
        let applied = state
            .apply_change(put(5, with_segment(flag("prod", "a", &["on"]), "s")))
            .unwrap();
        assert_eq!(
            applied.changed["prod"],
            vec!["a".to_string(), "d".to_string()]
        );
        let delete = Delta::DeleteFlag {
            namespace: "prod".into(),
            key: "d".into(),
        };
        state
            .apply_change(Change {
                chain: Vec::new(),
                revision: 6,
                deltas: vec![delete],
            })
            .unwrap();
        let applied = state
            .apply_change(put(7, flag("prod", "a", &["on"])))
            .unwrap();
        assert_eq!(applied.changed["prod"], vec!["a".to_string()]);
    }

    #[test]
    fn changes_apply_in_order_only() {
        let state = base();
        let change = |revision| Change {
            chain: Vec::new(),
            revision,
            deltas: vec![Delta::PutFlag(flag("prod", "x", &["on"]))],
        };
        assert_eq!(
            state.apply_change(change(3)),
            Err(ApplyError::OutOfOrder { applied: 1, got: 3 })
        );
        assert_eq!(
            state.apply_change(change(1)),
            Err(ApplyError::OutOfOrder { applied: 1, got: 1 })
        );
        assert!(state.load().namespaces["prod"].flags.get("x").is_none());
        assert!(state.apply_change(change(2)).is_ok());
        let empty = State::new(None);
        assert_eq!(
            empty.apply_change(change(1)),
            Err(ApplyError::NoFullState { got: 1 })
        );
        // An older snapshot still replaces the state: the writer is the source of truth.
        state.install(SnapshotBuilder {
            revision: 1,
            ..Default::default()
        });
        assert_eq!(state.revision(), 1);
        assert!(state.load().namespaces.is_empty());
    }

    #[test]
    fn readers_keep_the_state_they_loaded() {
        let state = base();
        let before = state.load();
        state
            .apply_change(Change {
                chain: Vec::new(),
                revision: 2,
                deltas: vec![Delta::DeleteFlag {
                    namespace: "prod".into(),
                    key: "d".into(),
                }],
            })
            .unwrap();
        assert!(before.namespaces["prod"].flags.get("d").is_some());
        assert!(state.load().namespaces["prod"].flags.get("d").is_none());
        assert!(
            Arc::ptr_eq(&before.namespaces["dev"], &state.load().namespaces["dev"]),
            "untouched namespaces are shared"
        );
    }

    #[test]
    fn counters_survive_edits_and_carry_over_variants() {
        let state = base();
        let count = |state: &State, key: &str| -> Vec<(Option<String>, u64)> {
            let replica = state.load();
            replica.namespaces["prod"]
                .counters(key)
                .unwrap()
                .iter()
                .map(|(v, _, n)| (v.map(str::to_string), n))
                .collect()
        };
        let record = |variant: Option<&str>, reason: Reason| {
            let replica = state.load();
            let ns = &replica.namespaces["prod"];
            let flag = ns.flags.get("d").unwrap().source();
            let index = variant.map(|v| flag.variants.iter().position(|w| w.name == v).unwrap());
            ns.counters("d").unwrap().record(flag, index, reason);
        };
        assert_eq!(
            count(&state, "d"),
            vec![],
            "nothing is counted before an evaluation"
        );
        record(Some("on"), Reason::Static);
        record(None, Reason::Error);
        state
            .apply_change(Change {
                chain: Vec::new(),
                revision: 2,
                deltas: vec![Delta::PutFlag(flag("prod", "d", &["on"]))],
            })
            .unwrap();
        assert_eq!(count(&state, "d"), vec![(Some("on".into()), 1), (None, 1)]);
        state
            .apply_change(Change {
                chain: Vec::new(),
                revision: 3,
                deltas: vec![Delta::PutFlag(flag("prod", "d", &["off", "on"]))],
            })
            .unwrap();
        assert_eq!(
            count(&state, "d"),
            vec![(Some("on".into()), 1), (None, 1)],
            "counts follow the variant, not its position"
        );
    }

    #[test]
    fn counts_from_many_threads_add_up_and_carry_over() {
        let state = base();
        let threads = 2 * stripes() + 1;
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    let replica = state.load();
                    let ns = &replica.namespaces["prod"];
                    let flag = ns.flags.get("d").unwrap().source();
                    for _ in 0..1000 {
                        ns.counters("d")
                            .unwrap()
                            .record(flag, Some(0), Reason::Split);
                    }
                });
            }
        });
        let count = |state: &State| -> Vec<(Option<String>, Reason, u64)> {
            let replica = state.load();
            replica.namespaces["prod"]
                .counters("d")
                .unwrap()
                .iter()
                .map(|(v, r, n)| (v.map(str::to_string), r, n))
                .collect()
        };
        let all = 1000 * threads as u64;
        assert_eq!(count(&state), vec![(Some("on".into()), Reason::Split, all)]);
        // New variants: the counts move into fresh counters, summed over the stripes.
        state
            .apply_change(Change {
                chain: Vec::new(),
                revision: 2,
                deltas: vec![Delta::PutFlag(flag("prod", "d", &["off", "on"]))],
            })
            .unwrap();
        assert_eq!(count(&state), vec![(Some("on".into()), Reason::Split, all)]);
    }

    #[tokio::test]
    async fn revision_waits_end_when_the_revision_is_applied() {
        let state = Arc::new(base());
        let waiter = tokio::spawn({
            let state = state.clone();
            async move { state.wait_for_revision(2).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        state
            .apply_change(Change {
                chain: Vec::new(),
                revision: 2,
                deltas: vec![],
            })
            .unwrap();
        assert_eq!(waiter.await.unwrap(), 2);
    }
}
