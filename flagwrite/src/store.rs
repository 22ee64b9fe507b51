//! The durable store: the only module that touches sled.
//!
//! # Layout on disk (one sled database)
//! - tree `namespaces`: namespace key → encoded `pb::Namespace`
//! - tree `flags`: `<namespace> 0x00 <key>` → encoded `pb::Flag`
//! - tree `segments`: `<namespace> 0x00 <key>` → encoded `pb::Segment`
//! - tree `changelog`: revision as 8 big-endian bytes → encoded [`LogRecord`]
//!   (big-endian so byte order is revision order)
//! - tree `meta`: `head` → the latest committed revision; `compacted` → the
//!   highest revision removed from the change log by retention;
//!   `compacted_chain` → the history position at `compacted`; `history` →
//!   the store's history identity (random, made when the store is created).
//!
//! Architecture Invariant: one write is one sled transaction over all five
//! trees that checks the head counter, writes the objects and the change-log
//! entry and bumps the head, so revisions are gap-free and the log always
//! matches the objects. Objects are derived from the log record (its entries'
//! `after` images), so they cannot disagree.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::RwLock;

use flagstream::pb;
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

/// One committed write as kept in the change log: who, when, why, and every
/// object it changed with its before and after image.
#[derive(Clone, PartialEq, Message)]
pub struct LogRecord {
    /// The revision the write committed.
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    /// When it committed (UTC).
    #[prost(message, optional, tag = "2")]
    pub time: Option<prost_types::Timestamp>,
    /// Name of the token that made it.
    #[prost(string, tag = "3")]
    pub actor: String,
    /// The request's comment.
    #[prost(string, tag = "4")]
    pub comment: String,
    /// The RPC, e.g. `UpdateFlag`.
    #[prost(string, tag = "5")]
    pub operation: String,
    /// The one namespace every write touches (used to filter history and
    /// the change stream without decoding objects).
    #[prost(string, tag = "6")]
    pub namespace: String,
    /// The objects changed; only `kind`, `key`, `before` and `after` are set
    /// (the rest is the record's and filled in when history is read).
    #[prost(message, repeated, tag = "7")]
    pub entries: Vec<pb::HistoryEntry>,
    /// The history position after this record ([`flagstream::digest`]):
    /// chained over the previous position and this record's encoding with
    /// this field empty. Set by [`Store::commit`]; records written before
    /// positions existed have none, and count as their history's origin.
    #[prost(bytes = "vec", tag = "8")]
    pub chain: Vec<u8>,
}

/// The position of a [`LogRecord`], decoded without the rest.
#[derive(Clone, PartialEq, Message)]
struct LogChain {
    #[prost(bytes = "vec", tag = "8")]
    chain: Vec<u8>,
}

/// The namespace of a [`LogRecord`], decoded without the rest: prost steps
/// over the bytes of fields a message does not declare.
#[derive(Clone, PartialEq, Message)]
struct LogHead {
    #[prost(string, tag = "6")]
    namespace: String,
}

/// The kind and key of each entry of a [`LogRecord`], without the objects'
/// images.
#[derive(Clone, PartialEq, Message)]
struct LogEntryHeads {
    #[prost(message, repeated, tag = "7")]
    entries: Vec<EntryHead>,
}

/// The part of a `pb::HistoryEntry` that names the object.
#[derive(Clone, PartialEq, Message)]
struct EntryHead {
    #[prost(int32, tag = "6")]
    kind: i32,
    #[prost(string, tag = "7")]
    key: String,
}

/// A consistent copy of every object at one revision, for snapshots.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The revision the copy reflects.
    pub revision: u64,
    /// The history position at `revision`.
    pub chain: Vec<u8>,
    pub namespaces: Vec<pb::Namespace>,
    pub flags: Vec<pb::Flag>,
    pub segments: Vec<pb::Segment>,
}

/// Failures of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or internal error.
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// Stored bytes did not decode, or an invariant did not hold.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// Making writes durable failed (an fsync or directory sync); what is
    /// on disk is unknown, so the process must stop and recover.
    #[error("cannot make writes durable: {what}: {source}")]
    Sync {
        what: String,
        source: std::io::Error,
    },
}

/// The store handle; cheap to clone, shared by the writer and all readers.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    namespaces: sled::Tree,
    flags: sled::Tree,
    segments: sled::Tree,
    changelog: sled::Tree,
    meta: sled::Tree,
    /// Held (write) by `commit` for the length of one transaction and (read)
    /// by `snapshot` while it copies the trees, so a snapshot never sees half
    /// a write. Commits are microseconds, so snapshots wait little; a
    /// snapshot holds writers back only while it copies (no encoding).
    commit_lock: RwLock<()>,
    /// What `flush` syncs beyond sled's own writes.
    disk: Disk,
    /// The history identity (`meta/history`).
    history_id: String,
}

/// The parts of the sled database that `Store::flush` syncs itself. sled
/// 0.34's own flush ends in `sync_file_range` on Linux, which neither passes
/// the device's volatile cache nor syncs metadata, so the log file gets an
/// `fdatasync` of ours. Blob files (values above a quarter of a log segment,
/// 128 KiB) are fsynced with their directory by sled itself when written,
/// before the log points at them: a change of ours to the vendored sled
/// (`vendor/sled/FLAGSTREAM.md`).
struct Disk {
    /// sled's log file (`<dir>/db`), opened once for `fdatasync`.
    log: File,
}

const HEAD: &[u8] = b"head";
const COMPACTED: &[u8] = b"compacted";
const COMPACTED_CHAIN: &[u8] = b"compacted_chain";
const HISTORY: &[u8] = b"history";

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    ///
    /// sled's periodic flusher is off: every sync of the log is `flush`'s,
    /// once per group of writes.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open()?;
        let meta = db.open_tree("meta")?;
        // A store made before history identities gets one now: replicas
        // holding its state resync once.
        let history_id = match meta.get(HISTORY)? {
            Some(id) => String::from_utf8(id.to_vec())
                .map_err(|_| StoreError::Corrupt("the history identity is not UTF-8".into()))?,
            None => {
                let id = flagstream::digest::new_history_id();
                meta.insert(HISTORY, id.as_bytes())?;
                db.flush()?;
                id
            }
        };
        let disk = Disk::open(dir)?;
        let inner = Inner {
            disk,
            history_id,
            namespaces: db.open_tree("namespaces")?,
            flags: db.open_tree("flags")?,
            segments: db.open_tree("segments")?,
            changelog: db.open_tree("changelog")?,
            meta,
            commit_lock: RwLock::new(()),
            db,
        };
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// The store's history identity.
    pub fn history_id(&self) -> &str {
        &self.inner.history_id
    }

    /// The history position at `revision`; `None` when the store cannot
    /// tell (compacted away, or beyond the head), which a subscriber must
    /// treat as a mismatch.
    pub fn position(&self, revision: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let origin = || flagstream::digest::origin(&self.inner.history_id, revision);
        if revision == 0 {
            return Ok(Some(origin()));
        }
        if let Some(bytes) = self.inner.changelog.get(revision.to_be_bytes())? {
            let chain = decode::<LogChain>(&bytes)?.chain;
            return Ok(Some(if chain.is_empty() { origin() } else { chain }));
        }
        if revision == self.compacted()? {
            return Ok(Some(match self.inner.meta.get(COMPACTED_CHAIN)? {
                Some(chain) => chain.to_vec(),
                None => origin(),
            }));
        }
        Ok(None)
    }

    /// The latest committed revision (0 for an empty store).
    pub fn head(&self) -> Result<u64, StoreError> {
        read_u64(self.inner.meta.get(HEAD)?)
    }

    /// The highest revision removed from the change log (0 when none was).
    /// Changes after it are still in the log.
    pub fn compacted(&self) -> Result<u64, StoreError> {
        read_u64(self.inner.meta.get(COMPACTED)?)
    }

    pub fn namespace(&self, key: &str) -> Result<Option<pb::Namespace>, StoreError> {
        self.inner
            .namespaces
            .get(key)?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Every namespace, ordered by key.
    pub fn namespaces(&self) -> Result<Vec<pb::Namespace>, StoreError> {
        self.inner
            .namespaces
            .iter()
            .map(|kv| decode(&kv?.1))
            .collect()
    }

    pub fn flag(&self, namespace: &str, key: &str) -> Result<Option<pb::Flag>, StoreError> {
        self.inner
            .flags
            .get(object_key(namespace, key))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// The flags of `namespace` with keys after `after` (all when empty),
    /// ordered by key.
    pub fn flags_after<'a>(
        &'a self,
        namespace: &str,
        after: &str,
    ) -> impl Iterator<Item = Result<pb::Flag, StoreError>> + 'a {
        scan(&self.inner.flags, namespace, "", after)
    }

    /// The flags of `namespace` whose keys start with `prefix`, after `after`
    /// (from the first when empty), ordered by key. Only the prefix's own
    /// flags are read: the scan starts at the prefix and ends past it.
    pub fn flags_with_prefix<'a>(
        &'a self,
        namespace: &str,
        prefix: &str,
        after: &str,
    ) -> impl Iterator<Item = Result<pb::Flag, StoreError>> + 'a {
        scan(&self.inner.flags, namespace, prefix, after)
    }

    /// The keys of the flags and of the segments of `namespace`, in key
    /// order, read without decoding the objects.
    pub fn object_keys(&self, namespace: &str) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let keys = |tree: &sled::Tree| -> Result<Vec<String>, StoreError> {
            let within = object_key(namespace, "");
            tree.scan_prefix(&within)
                .keys()
                .map(|key| {
                    let key = key?;
                    String::from_utf8(key[within.len()..].to_vec())
                        .map_err(|e| StoreError::Corrupt(format!("object key: {e}")))
                })
                .collect()
        };
        Ok((keys(&self.inner.flags)?, keys(&self.inner.segments)?))
    }

    pub fn segment(&self, namespace: &str, key: &str) -> Result<Option<pb::Segment>, StoreError> {
        self.inner
            .segments
            .get(object_key(namespace, key))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// The segments of `namespace` with keys after `after`, ordered by key.
    pub fn segments_after<'a>(
        &'a self,
        namespace: &str,
        after: &str,
    ) -> impl Iterator<Item = Result<pb::Segment, StoreError>> + 'a {
        scan(&self.inner.segments, namespace, "", after)
    }

    /// The change-log records after revision `after`, oldest first.
    pub fn log_after(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<LogRecord, StoreError>> + use<> {
        self.inner
            .changelog
            .range(after.saturating_add(1).to_be_bytes()..)
            .map(|kv| decode(&kv?.1))
    }

    /// The change-log records of `namespace` before revision `before`,
    /// newest first, that have an entry of `kind` (any when 0) with `key`
    /// (any when empty). Only those records are decoded in full: the rest
    /// are read as far as their namespace (and, with a filter, their
    /// entries' kinds and keys), so a history query does not decode the
    /// objects of every write in the log.
    pub fn history_before<'a>(
        &'a self,
        before: u64,
        namespace: &'a str,
        kind: i32,
        key: &'a str,
    ) -> impl Iterator<Item = Result<LogRecord, StoreError>> + 'a {
        let filtered = kind != 0 || !key.is_empty();
        self.inner
            .changelog
            .range(..before.to_be_bytes())
            .rev()
            .filter_map(move |kv| {
                let record = || -> Result<Option<LogRecord>, StoreError> {
                    let (_, bytes) = kv?;
                    if decode::<LogHead>(&bytes)?.namespace != namespace {
                        return Ok(None);
                    }
                    let names = |e: &EntryHead| {
                        (kind == 0 || e.kind == kind) && (key.is_empty() || e.key == key)
                    };
                    if filtered && !decode::<LogEntryHeads>(&bytes)?.entries.iter().any(names) {
                        return Ok(None);
                    }
                    decode(&bytes).map(Some)
                };
                record().transpose()
            })
    }

    /// Commits one write in one transaction: checks that `record.revision`
    /// is the head plus one, puts or deletes every object of its entries,
    /// appends the record to the change log and moves the head. Not yet
    /// durable: call [`Store::flush`] before acknowledging.
    /// Sets `record.chain` to the position after it.
    pub fn commit(&self, record: &mut LogRecord) -> Result<(), StoreError> {
        let previous = self
            .position(record.revision.saturating_sub(1))?
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "no history position at revision {}",
                    record.revision.saturating_sub(1)
                ))
            })?;
        record.chain.clear();
        record.chain = flagstream::digest::next(&previous, &record.encode_to_vec());
        let mut writes: Vec<(u8, Vec<u8>, Option<Vec<u8>>)> =
            Vec::with_capacity(record.entries.len());
        for entry in &record.entries {
            let object = entry.after.as_ref().or(entry.before.as_ref());
            let (tree, key, value) = match object.and_then(|o| o.kind.as_ref()) {
                Some(pb::object::Kind::Namespace(ns)) => {
                    (0, ns.key.as_bytes().to_vec(), after_bytes(&entry.after))
                }
                Some(pb::object::Kind::Flag(f)) => (
                    1,
                    object_key(&f.namespace, &f.key),
                    after_bytes(&entry.after),
                ),
                Some(pb::object::Kind::Segment(s)) => (
                    2,
                    object_key(&s.namespace, &s.key),
                    after_bytes(&entry.after),
                ),
                None => return Err(StoreError::Corrupt("log entry without an object".into())),
            };
            writes.push((tree, key, value));
        }
        let encoded = record.encode_to_vec();
        let revision = record.revision;
        let inner = &*self.inner;
        let _guard = inner.commit_lock.write().unwrap_or_else(|e| e.into_inner());
        let result = (
            &inner.namespaces,
            &inner.flags,
            &inner.segments,
            &inner.changelog,
            &inner.meta,
        )
            .transaction(|(namespaces, flags, segments, changelog, meta)| {
                let head =
                    read_u64(meta.get(HEAD)?).map_err(ConflictableTransactionError::Abort)?;
                if head + 1 != revision {
                    return Err(ConflictableTransactionError::Abort(StoreError::Corrupt(
                        format!("revision {revision} does not follow head {head}"),
                    )));
                }
                for (tree, key, value) in &writes {
                    let tree = [namespaces, flags, segments][usize::from(*tree)];
                    match value {
                        Some(value) => tree.insert(key.as_slice(), value.as_slice())?,
                        None => tree.remove(key.as_slice())?,
                    };
                }
                changelog.insert(&revision.to_be_bytes()[..], encoded.as_slice())?;
                meta.insert(HEAD, &revision.to_be_bytes()[..])?;
                Ok(())
            });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(StoreError::Sled(e)),
        }
    }

    /// Makes every commit so far durable: writes sled's buffers and
    /// `fdatasync`s the log file (blob files were synced by sled when it
    /// wrote them, see [`Disk`]). One round of syncs covers every commit
    /// before it (group commit). Blocks: call it from the writer thread or
    /// `spawn_blocking`.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush()?;
        self.inner.disk.sync_log()
    }

    /// Removes change-log records so at most `retain` remain, recording the
    /// highest removed revision. Returns how many were removed. Called by
    /// the writer between batches, so it never races a commit.
    pub fn compact(&self, retain: u64) -> Result<u64, StoreError> {
        let head = self.head()?;
        let compacted = self.compacted()?;
        let keep_from = head.saturating_sub(retain) + 1;
        if keep_from <= compacted + 1 {
            return Ok(0);
        }
        let new_compacted = keep_from - 1;
        let chain = self.position(new_compacted)?.ok_or_else(|| {
            StoreError::Corrupt(format!("no history position at revision {new_compacted}"))
        })?;
        // The watermark moves first (with the position there, in one
        // batch): a crash half-way leaves some records below it, which
        // readers never use and the next compaction removes.
        let mut batch = sled::Batch::default();
        batch.insert(COMPACTED, &new_compacted.to_be_bytes()[..]);
        batch.insert(COMPACTED_CHAIN, chain);
        self.inner.meta.apply_batch(batch)?;
        let mut removed = 0;
        for kv in self.inner.changelog.range(..keep_from.to_be_bytes()) {
            self.inner.changelog.remove(kv?.0)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Copies every object at one revision.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let inner = &*self.inner;
        let (revision, raw) = {
            let _guard = inner.commit_lock.read().unwrap_or_else(|e| e.into_inner());
            let revision = self.head()?;
            let chain = self.position(revision)?.ok_or_else(|| {
                StoreError::Corrupt(format!("no history position at the head {revision}"))
            })?;
            // Copying `IVec`s is cheap (reference counts for large values);
            // decoding happens after the lock is released.
            let copy = |tree: &sled::Tree| tree.iter().values().collect::<Result<Vec<_>, _>>();
            (
                (revision, chain),
                (
                    copy(&inner.namespaces)?,
                    copy(&inner.flags)?,
                    copy(&inner.segments)?,
                ),
            )
        };
        let (revision, chain) = revision;
        Ok(Snapshot {
            revision,
            chain,
            namespaces: raw.0.iter().map(|v| decode(v)).collect::<Result<_, _>>()?,
            flags: raw.1.iter().map(|v| decode(v)).collect::<Result<_, _>>()?,
            segments: raw.2.iter().map(|v| decode(v)).collect::<Result<_, _>>()?,
        })
    }
}

/// The stored bytes of every object of some namespaces at one revision: each value is an encoded
/// `pb::Namespace`, `pb::Segment` or `pb::Flag`, shared with sled (no copy, no decoding).
#[derive(Debug, Default)]
pub struct RawSnapshot {
    /// The revision the copy reflects.
    pub revision: u64,
    /// The history position at `revision`.
    pub chain: Vec<u8>,
    pub namespaces: Vec<sled::IVec>,
    pub segments: Vec<sled::IVec>,
    pub flags: Vec<sled::IVec>,
}

impl Store {
    /// The stored objects of `namespaces` (all when `None`) at one revision, undecoded: what a
    /// replication snapshot sends, as the store holds it. Taken under the same lock as
    /// [`Store::snapshot`], so it never holds half a write.
    pub fn raw_snapshot(
        &self,
        namespaces: Option<&std::collections::BTreeSet<String>>,
    ) -> Result<RawSnapshot, StoreError> {
        let inner = &*self.inner;
        let _guard = inner.commit_lock.read().unwrap_or_else(|e| e.into_inner());
        let revision = self.head()?;
        let chain = self.position(revision)?.ok_or_else(|| {
            StoreError::Corrupt(format!("no history position at the head {revision}"))
        })?;
        let mut raw = RawSnapshot {
            revision,
            chain,
            ..RawSnapshot::default()
        };
        match namespaces {
            None => {
                let all = |tree: &sled::Tree| tree.iter().values().collect::<Result<Vec<_>, _>>();
                raw.namespaces = all(&inner.namespaces)?;
                raw.segments = all(&inner.segments)?;
                raw.flags = all(&inner.flags)?;
            }
            Some(namespaces) => {
                for namespace in namespaces {
                    let Some(record) = inner.namespaces.get(namespace.as_bytes())? else {
                        continue;
                    };
                    raw.namespaces.push(record);
                    let within = object_key(namespace, "");
                    for (tree, out) in [
                        (&inner.segments, &mut raw.segments),
                        (&inner.flags, &mut raw.flags),
                    ] {
                        for value in tree.scan_prefix(&within).values() {
                            out.push(value?);
                        }
                    }
                }
            }
        }
        Ok(raw)
    }
}

impl Store {
    /// One namespace's record, flags and segments at one revision, or `None` when it does not
    /// exist: what `ExportNamespace` answers. Only that namespace's objects are read (a scan of
    /// its key range), under the same lock as [`Store::snapshot`], so the bundle is consistent
    /// whatever else the store holds.
    pub fn namespace_snapshot(&self, namespace: &str) -> Result<Option<Snapshot>, StoreError> {
        let inner = &*self.inner;
        let within = object_key(namespace, "");
        let (revision, chain, record, raw) = {
            let _guard = inner.commit_lock.read().unwrap_or_else(|e| e.into_inner());
            let Some(record) = inner.namespaces.get(namespace.as_bytes())? else {
                return Ok(None);
            };
            let revision = self.head()?;
            let chain = self.position(revision)?.ok_or_else(|| {
                StoreError::Corrupt(format!("no history position at the head {revision}"))
            })?;
            let copy = |tree: &sled::Tree| {
                tree.scan_prefix(&within)
                    .values()
                    .collect::<Result<Vec<_>, _>>()
            };
            (
                revision,
                chain,
                record,
                (copy(&inner.flags)?, copy(&inner.segments)?),
            )
        };
        Ok(Some(Snapshot {
            revision,
            chain,
            namespaces: vec![decode(&record)?],
            flags: raw.0.iter().map(|v| decode(v)).collect::<Result<_, _>>()?,
            segments: raw.1.iter().map(|v| decode(v)).collect::<Result<_, _>>()?,
        }))
    }
}

impl Disk {
    /// Opens the log file for syncing and makes everything sled created or
    /// recovered durable once: each file, each blob, `blobs/`, the data
    /// directory and its parent (which may have just made it).
    fn open(dir: &Path) -> Result<Disk, StoreError> {
        let log_path = dir.join("db");
        let log = File::open(&log_path).map_err(|source| sync_error(&log_path, source))?;
        let blobs = dir.join("blobs");
        for folder in [dir, blobs.as_path()] {
            let entries = std::fs::read_dir(folder).map_err(|source| sync_error(folder, source))?;
            for entry in entries {
                let path = entry.map_err(|source| sync_error(folder, source))?.path();
                if path.is_file() {
                    sync_path(&path)?;
                }
            }
        }
        sync_path(&blobs)?;
        sync_path(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_path(parent)?;
        }
        Ok(Disk { log })
    }

    /// `fdatasync`s the log file.
    fn sync_log(&self) -> Result<(), StoreError> {
        self.log.sync_data().map_err(|source| StoreError::Sync {
            what: "fdatasync of the log file".into(),
            source,
        })
    }
}

/// Fsyncs a file or directory by path.
fn sync_path(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| sync_error(path, source))
}

fn sync_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Sync {
        what: format!("fsync of {}", path.display()),
        source,
    }
}

/// The key of a flag or segment: namespace keys never contain 0x00.
fn object_key(namespace: &str, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(namespace.len() + 1 + key.len());
    out.extend_from_slice(namespace.as_bytes());
    out.push(0);
    out.extend_from_slice(key.as_bytes());
    out
}

/// The objects of `namespace` whose keys start with `prefix` (all when
/// empty) and come after `after`, in key order. Object keys are
/// `namespace \0 key`, so the namespace's own `\0` ends the scan at the
/// next namespace.
fn scan<T: Message + Default>(
    tree: &sled::Tree,
    namespace: &str,
    prefix: &str,
    after: &str,
) -> impl Iterator<Item = Result<T, StoreError>> + use<T> {
    let within = object_key(namespace, prefix);
    let mut start = object_key(namespace, after);
    if !after.is_empty() {
        // Just past `after`: the smallest key greater than it.
        start.push(0);
    }
    let start = start.max(within.clone());
    tree.range(start..)
        .take_while(move |kv| {
            kv.as_ref()
                .map_or(true, |(key, _)| key.starts_with(&within))
        })
        .map(|kv| decode(&kv?.1))
}

fn after_bytes(after: &Option<pb::Object>) -> Option<Vec<u8>> {
    after.as_ref().and_then(|o| match &o.kind {
        Some(pb::object::Kind::Namespace(ns)) => Some(ns.encode_to_vec()),
        Some(pb::object::Kind::Flag(f)) => Some(f.encode_to_vec()),
        Some(pb::object::Kind::Segment(s)) => Some(s.encode_to_vec()),
        None => None,
    })
}

fn decode<T: Message + Default>(bytes: &[u8]) -> Result<T, StoreError> {
    T::decode(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn read_u64(value: Option<sled::IVec>) -> Result<u64, StoreError> {
    match value {
        None => Ok(0),
        Some(v) => {
            let bytes: [u8; 8] = v
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("bad counter".into()))?;
            Ok(u64::from_be_bytes(bytes))
        }
    }
}
