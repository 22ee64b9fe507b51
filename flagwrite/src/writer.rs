//! The single writer: one thread that turns write requests into change-log
//! records, commits each in its own transaction and makes a whole batch
//! durable with one flush before acknowledging any of it (group commit).
//!
//! Architecture Invariant: only this thread commits, so a write validated
//! against the store's current state is committed against that same state,
//! and the next revision is simply the head plus one.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use flagstream::validate::{Element, shown};
use flagstream::{model, pb};
use tokio::sync::{mpsc, oneshot};

use crate::checks::{self, RegexChange, RegexUse, View};
use crate::error::Error;
use crate::feed::Feed;
use crate::metrics::Metrics;
use crate::store::{LogRecord, Store, StoreError};

/// What a write does.
#[derive(Debug, Clone)]
pub enum Op {
    CreateNamespace(pb::Namespace),
    DeleteNamespace {
        key: String,
    },
    CreateFlag(pb::Flag),
    UpdateFlag {
        flag: pb::Flag,
        expected: u64,
    },
    SetFlagEnabled {
        namespace: String,
        key: String,
        enabled: bool,
        expected: u64,
    },
    DeleteFlag {
        namespace: String,
        key: String,
        expected: u64,
    },
    CreateSegment(pb::Segment),
    UpdateSegment {
        segment: pb::Segment,
        expected: u64,
    },
    DeleteSegment {
        namespace: String,
        key: String,
        expected: u64,
    },
    /// Replaces a namespace's contents (the objects' own namespace fields
    /// are overridden); `path` prefixes error paths (`bundle` or
    /// `unleash_json`).
    Import {
        namespace: String,
        description: Option<String>,
        flags: Vec<model::Flag>,
        segments: Vec<model::Segment>,
        path: &'static str,
    },
}

/// One write request as the service hands it to the writer.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub op: Op,
    /// The token name, recorded as the actor.
    pub actor: String,
    pub comment: String,
    /// Validate and report, but commit nothing.
    pub validate_only: bool,
}

/// The result of a successful write.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The committed revision; 0 for `validate_only`.
    pub revision: u64,
    /// The object as stored (or as it would be); `None` for deletions and imports.
    pub object: Option<pb::Object>,
}

/// The handle services use to submit writes. When every handle is dropped
/// the writer finishes the queued writes, flushes and ends.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

struct Job {
    request: WriteRequest,
    reply: oneshot::Sender<Result<Outcome, Error>>,
    /// When the service handed it over (write latency counts the queue).
    queued: Instant,
}

/// How the writer thread ended.
#[derive(Debug)]
pub enum Exit {
    /// Every `Writer` was dropped and every queued write answered.
    Drained,
    /// Writing to the store failed (a flush, or I/O inside a commit): the
    /// writes of its group were answered UNAVAILABLE, every later one too,
    /// and the process must stop so that recovery runs on restart (fail-stop: after a failed fsync the kernel may
    /// have dropped the dirty pages, so retrying could report success for
    /// data that is gone).
    FlushFailed(StoreError),
}

impl Writer {
    /// Starts the writer on a thread of its own (validation, commit and
    /// the fsyncs block; they must not hold up the async runtime). The
    /// receiver completes when it ends: when every `Writer` clone is
    /// dropped and the queue is drained, or at once when a flush fails.
    pub fn spawn(
        store: Store,
        feed: Arc<Feed>,
        metrics: Arc<Metrics>,
        retention: u64,
    ) -> std::io::Result<(Writer, oneshot::Receiver<Exit>)> {
        let (tx, rx) = mpsc::channel(4096);
        let (exit_tx, exit_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("flagwrite-writer".into())
            .spawn(move || {
                let exit = run(&store, &feed, &metrics, retention, rx);
                let _ = exit_tx.send(exit);
            })?;
        Ok((Writer { tx }, exit_rx))
    }

    /// Submits a write and waits until it is durable (or refused).
    pub async fn write(&self, request: WriteRequest) -> Result<Outcome, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                request,
                reply,
                queued: Instant::now(),
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }
}

/// A write committed (or refused) but not yet acknowledged: it waits for
/// the flush of its group.
struct Pending {
    reply: oneshot::Sender<Result<Outcome, Error>>,
    result: Result<Outcome, Error>,
    record: Option<LogRecord>,
    started: Instant,
}

/// The most writes one group commits before it flushes, so the first
/// writer of a long burst is not kept waiting for the whole burst.
const MAX_GROUP: usize = 1024;

/// The writer loop (group commit): takes every write queued so far (at
/// least one, waiting for it), commits each in its own transaction, then
/// makes the whole group durable with one flush and only then answers and
/// publishes it. Writes that arrive during a flush queue up and form the
/// next group, so the cost stays one round of syncs per group however many
/// writers there are. Nothing commits while a flush runs, so a flush covers
/// exactly the group it answers.
fn run(
    store: &Store,
    feed: &Feed,
    metrics: &Metrics,
    retention: u64,
    mut rx: mpsc::Receiver<Job>,
) -> Exit {
    let mut group: Vec<Pending> = Vec::new();
    let mut regexes = RegexUse::default();
    loop {
        // Wait for the first write of a group; `None` means every handle is
        // dropped and the queue is empty.
        let Some(job) = rx.blocking_recv() else {
            return Exit::Drained;
        };
        let mut next = Some(job);
        // An I/O error inside a commit (sled writing or syncing a blob)
        // is as final as a failed flush.
        let mut failed: Option<StoreError> = None;
        while let Some(job) = next.take() {
            let started = job.queued;
            let (result, record) = match apply(store, &mut regexes, job.request) {
                Ok((outcome, record)) => (Ok(outcome), record),
                Err(Error::Store(StoreError::Sled(sled::Error::Io(source)))) => {
                    failed = Some(StoreError::Sync {
                        what: "a commit's write".into(),
                        source,
                    });
                    (Err(Error::ShuttingDown), None)
                }
                Err(e) => (Err(e), None),
            };
            group.push(Pending {
                reply: job.reply,
                result,
                record,
                started,
            });
            if group.len() < MAX_GROUP && failed.is_none() {
                next = rx.try_recv().ok();
            }
        }
        if failed.is_none() && group.iter().any(|p| p.record.is_some()) {
            metrics.flushes.inc();
            failed = store.flush().err();
        }
        if let Some(e) = failed {
            tracing::error!(error = %e, "writing to the store failed: acknowledged nothing of the group; refusing every write and stopping so that recovery runs on restart");
            let message = format!("the write may not be durable, flagwrite is stopping: {e}");
            for pending in group.drain(..) {
                let _ = pending.reply.send(Err(Error::NotDurable(message.clone())));
            }
            rx.close();
            while let Ok(job) = rx.try_recv() {
                let _ = job.reply.send(Err(Error::ShuttingDown));
            }
            return Exit::FlushFailed(e);
        }
        let head = group
            .iter()
            .filter_map(|p| p.record.as_ref())
            .map(|r| r.revision)
            .max();
        acknowledge(std::mem::take(&mut group), feed, metrics);
        if let Some(head) = head {
            compact(store, feed, retention, head);
        }
    }
}

/// Publishes a durable group to subscribers (in revision order) and answers
/// its writers.
fn acknowledge(group: Vec<Pending>, feed: &Feed, metrics: &Metrics) {
    for pending in group {
        if let Some(record) = pending.record {
            let revision = record.revision;
            feed.publish(crate::feed::encode(record));
            metrics.head_revision.set(revision as i64);
        }
        metrics.write_latency.observe(pending.started.elapsed());
        let _ = pending.reply.send(pending.result);
    }
}

/// Compacts the change log when it holds more than `retention` revisions
/// (with `retention / 16` of slack so removals come in batches). Runs in the
/// writer between commits, so it never races one.
fn compact(store: &Store, feed: &Feed, retention: u64, head: u64) {
    if retention == 0 {
        return;
    }
    let compacted = feed.compacted();
    if head.saturating_sub(compacted) > retention + retention / 16 {
        match store.compact(retention) {
            Ok(_) => feed.set_compacted(store.compacted().unwrap_or(compacted)),
            Err(e) => tracing::warn!(error = %e, "change-log compaction failed"),
        }
    }
}

/// Plans one write against the current state and commits it (unless
/// validate-only), keeping `regexes` in step with what is committed. Returns
/// the outcome and the committed record.
fn apply(
    store: &Store,
    regexes: &mut RegexUse,
    request: WriteRequest,
) -> Result<(Outcome, Option<LogRecord>), Error> {
    let WriteRequest {
        op,
        actor,
        comment,
        validate_only,
    } = request;
    checks::comment(&comment)?;
    let operation = op_name(&op);
    let revision = store.head()? + 1;
    let now = SystemTime::now();
    let stamp_time = prost_types::Timestamp::from(now);
    let mut plan = Plan {
        store,
        revision,
        actor: &actor,
        time: stamp_time,
        entries: Vec::new(),
        object: None,
        namespace: String::new(),
        regexes,
        regex_changes: Vec::new(),
    };
    plan.build(op)?;
    let Plan {
        entries,
        object,
        namespace,
        regex_changes,
        ..
    } = plan;
    if validate_only {
        return Ok((
            Outcome {
                revision: 0,
                object,
            },
            None,
        ));
    }
    let mut record = LogRecord {
        revision,
        time: Some(stamp_time),
        actor,
        comment,
        operation: operation.to_string(),
        namespace,
        entries,
        chain: Vec::new(),
    };
    store.commit(&mut record)?;
    regexes.apply(regex_changes);
    Ok((Outcome { revision, object }, Some(record)))
}

/// The RPC name of an operation, recorded in the history.
pub fn op_name(op: &Op) -> &'static str {
    match op {
        Op::CreateNamespace(_) => "CreateNamespace",
        Op::DeleteNamespace { .. } => "DeleteNamespace",
        Op::CreateFlag(_) => "CreateFlag",
        Op::UpdateFlag { .. } => "UpdateFlag",
        Op::SetFlagEnabled { .. } => "SetFlagEnabled",
        Op::DeleteFlag { .. } => "DeleteFlag",
        Op::CreateSegment(_) => "CreateSegment",
        Op::UpdateSegment { .. } => "UpdateSegment",
        Op::DeleteSegment { .. } => "DeleteSegment",
        Op::Import { .. } => "ImportNamespace",
    }
}

/// A write being planned: its change-log entries and the object to return.
struct Plan<'a> {
    store: &'a Store,
    revision: u64,
    actor: &'a str,
    time: prost_types::Timestamp,
    entries: Vec<pb::HistoryEntry>,
    object: Option<pb::Object>,
    namespace: String,
    /// What each namespace's regexes take before this write.
    regexes: &'a mut RegexUse,
    /// What this write changes in `regexes` once committed.
    regex_changes: Vec<RegexChange>,
}

impl Plan<'_> {
    fn build(&mut self, op: Op) -> Result<(), Error> {
        match op {
            Op::CreateNamespace(ns) => {
                let mut ns = pb::Namespace::from(checks::namespace(ns, "namespace")?);
                if self.store.namespace(&ns.key)?.is_some() {
                    return Err(Error::AlreadyExists(format!(
                        "namespace {} already exists",
                        shown(&ns.key)
                    )));
                }
                ns.stamp = Some(self.stamp(None));
                self.namespace = ns.key.clone();
                self.put(None, Some(obj_ns(ns)), true);
            }
            Op::DeleteNamespace { key } => {
                let ns = self.namespace_required(&key)?;
                let (flags, segments) = self.store.object_keys(&key)?;
                if !flags.is_empty() || !segments.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "namespace {} is not empty: it holds flags [{}] and segments [{}]",
                        shown(&key),
                        list_names(&flags),
                        list_names(&segments)
                    )));
                }
                self.regex_changes.push(RegexChange::Forget(key.clone()));
                self.namespace = key;
                self.put(Some(obj_ns(ns)), None, false);
            }
            Op::CreateFlag(flag) => {
                let model = checks::flag_model(flag, "flag")?;
                self.namespace_required(&model.namespace)?;
                if self.store.flag(&model.namespace, &model.key)?.is_some() {
                    return Err(Error::AlreadyExists(format!(
                        "flag {} already exists in namespace {}",
                        shown(&model.key),
                        shown(&model.namespace)
                    )));
                }
                let mut view = self.view_for(&model)?;
                view.regex_bytes = self.regexes_elsewhere_flag(&model)?;
                let bytes = checks::flag(&model, &view, "flag")?;
                self.regex_set(pb::ObjectKind::Flag, &model.namespace, &model.key, bytes);
                self.store_flag(model, None)?;
            }
            Op::UpdateFlag { flag, expected } => {
                let model = checks::flag_model(flag, "flag")?;
                let stored = self.flag_required(&model.namespace, &model.key)?;
                check_expected(
                    &format!("flag {}", shown(&model.key)),
                    &stored.stamp,
                    expected,
                )?;
                let stored_type =
                    pb::FlagType::try_from(stored.r#type).unwrap_or(pb::FlagType::Unspecified);
                if pb::FlagType::from(model.flag_type) != stored_type {
                    return Err(Error::Invalid(format!(
                        "flag.type: the type of a flag cannot change (it is {})",
                        stored_type.as_str_name()
                    )));
                }
                let mut view = self.view_for(&model)?;
                view.regex_bytes = self.regexes_elsewhere_flag(&model)?;
                let bytes = checks::flag(&model, &view, "flag")?;
                self.regex_set(pb::ObjectKind::Flag, &model.namespace, &model.key, bytes);
                self.check_dependents(&model, &stored)?;
                self.store_flag(model, Some(stored))?;
            }
            Op::SetFlagEnabled {
                namespace,
                key,
                enabled,
                expected,
            } => {
                let stored = self.flag_required(&namespace, &key)?;
                check_expected(&format!("flag {}", shown(&key)), &stored.stamp, expected)?;
                let mut flag = stored.clone();
                flag.enabled = enabled;
                flag.stamp = Some(self.stamp(stored.stamp.as_ref()));
                self.namespace = namespace;
                self.put(Some(obj_flag(stored)), Some(obj_flag(flag)), true);
            }
            Op::DeleteFlag {
                namespace,
                key,
                expected,
            } => {
                let stored = self.flag_required(&namespace, &key)?;
                check_expected(&format!("flag {}", shown(&key)), &stored.stamp, expected)?;
                let mut dependents = Vec::new();
                for flag in self.store.flags_after(&namespace, "") {
                    let flag = flag?;
                    if flag.prerequisites.iter().any(|p| p.flag == key) {
                        dependents.push(flag.key);
                    }
                }
                if !dependents.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "flag {} is a prerequisite of flags [{}]",
                        shown(&key),
                        list_names(&dependents)
                    )));
                }
                self.regex_changes.push(RegexChange::Removed {
                    namespace: namespace.clone(),
                    kind: pb::ObjectKind::Flag,
                    key: key.clone(),
                });
                self.namespace = namespace;
                self.put(Some(obj_flag(stored)), None, false);
            }
            Op::CreateSegment(segment) => {
                let model = self.checked_segment(segment)?;
                self.namespace_required(&model.namespace)?;
                if self.store.segment(&model.namespace, &model.key)?.is_some() {
                    return Err(Error::AlreadyExists(format!(
                        "segment {} already exists in namespace {}",
                        shown(&model.key),
                        shown(&model.namespace)
                    )));
                }
                self.store_segment(model, None);
            }
            Op::UpdateSegment { segment, expected } => {
                let model = self.checked_segment(segment)?;
                let stored = self
                    .store
                    .segment(&model.namespace, &model.key)?
                    .ok_or_else(|| {
                        Error::NotFound(format!(
                            "segment {} not found in namespace {}",
                            shown(&model.key),
                            shown(&model.namespace)
                        ))
                    })?;
                check_expected(
                    &format!("segment {}", shown(&model.key)),
                    &stored.stamp,
                    expected,
                )?;
                self.store_segment(model, Some(stored));
            }
            Op::DeleteSegment {
                namespace,
                key,
                expected,
            } => {
                let stored = self.store.segment(&namespace, &key)?.ok_or_else(|| {
                    Error::NotFound(format!(
                        "segment {} not found in namespace {}",
                        shown(&key),
                        shown(&namespace)
                    ))
                })?;
                check_expected(&format!("segment {}", shown(&key)), &stored.stamp, expected)?;
                let mut users = Vec::new();
                for flag in self.store.flags_after(&namespace, "") {
                    let flag = flag?;
                    if flag.rules.iter().any(|r| r.segments.contains(&key)) {
                        users.push(flag.key);
                    }
                }
                if !users.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "segment {} is used by flags [{}]",
                        shown(&key),
                        list_names(&users)
                    )));
                }
                self.regex_changes.push(RegexChange::Removed {
                    namespace: namespace.clone(),
                    kind: pb::ObjectKind::Segment,
                    key: key.clone(),
                });
                self.namespace = namespace;
                self.put(Some(obj_segment(stored)), None, false);
            }
            Op::Import {
                namespace,
                description,
                flags,
                segments,
                path,
            } => {
                self.import(namespace, description, flags, segments, path)?;
            }
        }
        Ok(())
    }

    fn import(
        &mut self,
        namespace: String,
        description: Option<String>,
        mut flags: Vec<model::Flag>,
        mut segments: Vec<model::Segment>,
        path: &str,
    ) -> Result<(), Error> {
        let existing = self.store.namespace(&namespace)?;
        let ns_model = checks::namespace(
            pb::Namespace {
                key: namespace.clone(),
                description: description.clone().unwrap_or_else(|| {
                    existing
                        .as_ref()
                        .map(|n| n.description.clone())
                        .unwrap_or_default()
                }),
                stamp: None,
            },
            "namespace",
        )?;
        self.namespace = namespace.clone();
        for segment in &mut segments {
            segment.namespace = namespace.clone();
        }
        for flag in &mut flags {
            flag.namespace = namespace.clone();
        }
        // An Unleash export's order means nothing to its reader: name its
        // features by key.
        let names = if path == "unleash_json" {
            Element::Key
        } else {
            Element::Index
        };
        checks::bundle(&flags, &segments, names, path)?;
        self.regex_changes
            .push(RegexChange::Forget(namespace.clone()));

        // The namespace itself: created when missing, description replaced
        // when the import carries one.
        match existing {
            None => {
                let mut ns = pb::Namespace::from(ns_model);
                ns.stamp = Some(self.stamp(None));
                self.put(None, Some(obj_ns(ns)), false);
            }
            Some(old) if old.description != ns_model.description => {
                let mut ns = pb::Namespace::from(ns_model);
                ns.stamp = Some(self.stamp(old.stamp.as_ref()));
                self.put(Some(obj_ns(old)), Some(obj_ns(ns)), false);
            }
            Some(_) => {}
        }
        let mut old_flags: HashMap<String, pb::Flag> = HashMap::new();
        for flag in self.store.flags_after(&namespace, "") {
            let flag = flag?;
            old_flags.insert(flag.key.clone(), flag);
        }
        let mut old_segments: HashMap<String, pb::Segment> = HashMap::new();
        for segment in self.store.segments_after(&namespace, "") {
            let segment = segment?;
            old_segments.insert(segment.key.clone(), segment);
        }
        for model in segments {
            let old = old_segments.remove(&model.key);
            self.store_segment(model, old);
        }
        for model in flags {
            let old = old_flags.remove(&model.key);
            self.store_flag(model, old)?;
        }
        // Deletions last, sorted, so the record reads in a stable order.
        let mut gone: Vec<_> = old_flags.into_values().collect();
        gone.sort_by(|a, b| a.key.cmp(&b.key));
        for flag in gone {
            self.put(Some(obj_flag(flag)), None, false);
        }
        let mut gone: Vec<_> = old_segments.into_values().collect();
        gone.sort_by(|a, b| a.key.cmp(&b.key));
        for segment in gone {
            self.put(Some(obj_segment(segment)), None, false);
        }
        self.object = None;
        Ok(())
    }

    /// What the regexes of the rest of `flag`'s namespace take; 0, without
    /// reading the namespace, when the flag has no regex (the budget per
    /// namespace cannot be crossed by it).
    fn regexes_elsewhere_flag(&mut self, flag: &model::Flag) -> Result<usize, Error> {
        if !checks::has_regex(flag.rules.iter().flat_map(|r| &r.constraints)) {
            return Ok(0);
        }
        self.regexes
            .others(self.store, &flag.namespace, pb::ObjectKind::Flag, &flag.key)
    }

    /// Converts and validates a segment against its namespace.
    fn checked_segment(&mut self, segment: pb::Segment) -> Result<model::Segment, Error> {
        let model = checks::segment_model(segment, "segment")?;
        let elsewhere = if checks::has_regex(&model.constraints) {
            self.regexes.others(
                self.store,
                &model.namespace,
                pb::ObjectKind::Segment,
                &model.key,
            )?
        } else {
            0
        };
        let bytes = checks::segment(&model, elsewhere, "segment")?;
        self.regex_set(pb::ObjectKind::Segment, &model.namespace, &model.key, bytes);
        Ok(model)
    }

    /// Records that the object will hold regexes taking `bytes`.
    fn regex_set(&mut self, kind: pb::ObjectKind, namespace: &str, key: &str, bytes: usize) {
        self.regex_changes.push(RegexChange::Set {
            namespace: namespace.to_string(),
            kind,
            key: key.to_string(),
            bytes,
        });
    }

    fn stamp(&self, old: Option<&pb::Stamp>) -> pb::Stamp {
        pb::Stamp {
            created_revision: old.map_or(self.revision, |s| s.created_revision),
            updated_revision: self.revision,
            updated_at: Some(self.time),
            updated_by: self.actor.to_string(),
        }
    }

    fn store_flag(&mut self, model: model::Flag, old: Option<pb::Flag>) -> Result<(), Error> {
        let mut flag = pb::Flag::from(model);
        flag.stamp = Some(self.stamp(old.as_ref().and_then(|f| f.stamp.as_ref())));
        self.namespace = flag.namespace.clone();
        self.put(old.map(obj_flag), Some(obj_flag(flag)), true);
        Ok(())
    }

    fn store_segment(&mut self, model: model::Segment, old: Option<pb::Segment>) {
        let mut segment = pb::Segment::from(model);
        segment.stamp = Some(self.stamp(old.as_ref().and_then(|s| s.stamp.as_ref())));
        self.namespace = segment.namespace.clone();
        self.put(old.map(obj_segment), Some(obj_segment(segment)), true);
    }

    /// Adds a history entry; `returned` makes `after` the object the RPC returns.
    fn put(&mut self, before: Option<pb::Object>, after: Option<pb::Object>, returned: bool) {
        let (kind, key) = match before
            .as_ref()
            .or(after.as_ref())
            .and_then(|o| o.kind.as_ref())
        {
            Some(pb::object::Kind::Namespace(n)) => (pb::ObjectKind::Namespace, n.key.clone()),
            Some(pb::object::Kind::Flag(f)) => (pb::ObjectKind::Flag, f.key.clone()),
            Some(pb::object::Kind::Segment(s)) => (pb::ObjectKind::Segment, s.key.clone()),
            None => (pb::ObjectKind::Unspecified, String::new()),
        };
        if returned {
            self.object = after.clone();
        }
        self.entries.push(pb::HistoryEntry {
            kind: kind as i32,
            key,
            before,
            after,
            ..Default::default()
        });
    }

    fn namespace_required(&self, key: &str) -> Result<pb::Namespace, Error> {
        self.store
            .namespace(key)?
            .ok_or_else(|| Error::NotFound(format!("namespace {} not found", shown(key))))
    }

    fn flag_required(&self, namespace: &str, key: &str) -> Result<pb::Flag, Error> {
        self.store.flag(namespace, key)?.ok_or_else(|| {
            Error::NotFound(format!(
                "flag {} not found in namespace {}",
                shown(key),
                shown(namespace)
            ))
        })
    }

    /// Checks that updating `flag` (stored as `old`) leaves the flags that depend on it valid:
    /// the variants their prerequisites name still exist, and their prerequisite chains stay
    /// within what the engine evaluates. Only an update that drops a variant or changes the
    /// flag's prerequisites can break a dependent, so only those read the namespace.
    fn check_dependents(&self, flag: &model::Flag, old: &pb::Flag) -> Result<(), Error> {
        let dropped: BTreeSet<&str> = old
            .variants
            .iter()
            .map(|v| v.name.as_str())
            .filter(|name| !flag.variants.iter().any(|v| v.name == *name))
            .collect();
        // Any change to the list of parents (even a repeat) may lengthen chains or add
        // evaluations above this flag.
        let old_parents: Vec<&str> = old.prerequisites.iter().map(|p| p.flag.as_str()).collect();
        let parents: Vec<&str> = flag.prerequisites.iter().map(|p| p.flag.as_str()).collect();
        let deeper = parents != old_parents;
        if dropped.is_empty() && !deeper {
            return Ok(());
        }
        let mut view = View::default();
        for stored in self.store.flags_after(&flag.namespace, "") {
            let stored = stored?;
            if stored.key != flag.key {
                view.flags.insert(stored.key.clone(), stored_model(stored)?);
            }
        }
        view.flags.insert(flag.key.clone(), flag.clone());

        let mut named = Vec::new();
        for dependent in view.flags.values() {
            for p in dependent
                .prerequisites
                .iter()
                .filter(|p| p.flag == flag.key)
            {
                for variant in p.variants.iter().filter(|v| dropped.contains(v.as_str())) {
                    named.push(format!("{} by {}", shown(variant), shown(&dependent.key)));
                }
            }
        }
        if !named.is_empty() {
            named.sort();
            let more = named.len().saturating_sub(5);
            named.truncate(5);
            if more > 0 {
                named.push(format!("and {more} more"));
            }
            return Err(Error::FailedPrecondition(format!(
                "flag.variants: prerequisites name variants this update removes: {}",
                named.join(", ")
            )));
        }
        if deeper {
            // Every flag with `flag` somewhere below it, each checked once.
            let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
            for dependent in view.flags.values() {
                for p in &dependent.prerequisites {
                    children
                        .entry(p.flag.as_str())
                        .or_default()
                        .push(dependent.key.as_str());
                }
            }
            let mut seen = BTreeSet::from([flag.key.as_str()]);
            let mut pending = vec![flag.key.as_str()];
            while let Some(key) = pending.pop() {
                for &dependent in children.get(key).into_iter().flatten() {
                    if !seen.insert(dependent) {
                        continue;
                    }
                    pending.push(dependent);
                    flagstream::validate::prerequisite_cost(&view.flags[dependent], &view)
                        .map_err(|e| {
                            Error::Invalid(format!(
                                "flag.prerequisites: flag {dependent:?} depends on this flag, and with these prerequisites {}",
                                e.reason
                            ))
                        })?;
                }
            }
        }
        Ok(())
    }

    /// The view a flag is validated against: its transitive prerequisites
    /// (read from the store, with the new version of the flag itself) and the
    /// segments its rules name that exist.
    fn view_for(&self, flag: &model::Flag) -> Result<View, Error> {
        let mut view = View::default();
        view.flags.insert(flag.key.clone(), flag.clone());
        let mut pending: Vec<String> = flag.prerequisites.iter().map(|p| p.flag.clone()).collect();
        let mut seen = BTreeSet::new();
        while let Some(key) = pending.pop() {
            if !seen.insert(key.clone()) || view.flags.contains_key(&key) {
                continue;
            }
            if let Some(stored) = self.store.flag(&flag.namespace, &key)? {
                let model = stored_model(stored)?;
                pending.extend(model.prerequisites.iter().map(|p| p.flag.clone()));
                view.flags.insert(key, model);
            }
        }
        for rule in &flag.rules {
            for segment in &rule.segments {
                if self.store.segment(&flag.namespace, segment)?.is_some() {
                    view.segments.insert(segment.clone());
                }
            }
        }
        Ok(view)
    }
}

/// A stored flag in model types. Stored flags passed validation when written, so one that
/// does not convert is corruption.
fn stored_model(stored: pb::Flag) -> Result<model::Flag, Error> {
    model::Flag::try_from(stored)
        .map_err(|e| Error::Store(crate::store::StoreError::Corrupt(e.to_string())))
}

fn check_expected(what: &str, stamp: &Option<pb::Stamp>, expected: u64) -> Result<(), Error> {
    let current = stamp.as_ref().map_or(0, |s| s.updated_revision);
    if expected != 0 && expected != current {
        return Err(Error::Conflict {
            what: what.to_string(),
            current,
            expected,
        });
    }
    Ok(())
}

/// Names up to five keys, then how many more.
fn list_names(names: &[String]) -> String {
    let mut out: Vec<String> = names.iter().take(5).map(|n| format!("{n:?}")).collect();
    if names.len() > 5 {
        out.push(format!("and {} more", names.len() - 5));
    }
    out.join(", ")
}

fn obj_ns(ns: pb::Namespace) -> pb::Object {
    pb::Object {
        kind: Some(pb::object::Kind::Namespace(ns)),
    }
}

fn obj_flag(flag: pb::Flag) -> pb::Object {
    pb::Object {
        kind: Some(pb::object::Kind::Flag(flag)),
    }
}

fn obj_segment(segment: pb::Segment) -> pb::Object {
    pb::Object {
        kind: Some(pb::object::Kind::Segment(segment)),
    }
}
