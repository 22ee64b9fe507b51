//! Write-time validation for flagwrite: wire objects are converted into the
//! model (which names the offending field path) and checked by
//! `flagstream::validate` against a view of their namespace. Everything that
//! is stored went through here. [`RegexUse`] keeps what each namespace's
//! compiled regexes take, for the budget per namespace.

use std::collections::HashMap;

use flagstream::validate::{Element, FieldError, MemoryView};
use flagstream::{model, pb};

use crate::error::Error;
use crate::store::{Store, StoreError};

/// The part of a namespace a flag or segment is checked against: the flags
/// reachable through prerequisites (or a whole namespace, for imports) and the
/// segments that exist.
pub type View = MemoryView;

/// Converts and validates a namespace.
pub fn namespace(ns: pb::Namespace, prefix: &str) -> Result<model::Namespace, Error> {
    let ns = model::Namespace::try_from(ns).map_err(|e| invalid(prefix, e))?;
    flagstream::validate::namespace(&ns).map_err(|e| invalid(prefix, e))?;
    Ok(ns)
}

/// Converts a flag (without checking references).
pub fn flag_model(flag: pb::Flag, prefix: &str) -> Result<model::Flag, Error> {
    model::Flag::try_from(flag).map_err(|e| invalid(prefix, e))
}

/// Validates a flag against its namespace (whose other objects' regexes take
/// `view.regex_bytes`); returns what its own compiled regexes take.
pub fn flag(flag: &model::Flag, view: &View, prefix: &str) -> Result<usize, Error> {
    flagstream::validate::flag_measured(flag, view).map_err(|e| invalid(prefix, e))
}

/// Validates a segment whose namespace's other objects' regexes take
/// `elsewhere` bytes; returns what its own compiled regexes take.
pub fn segment(segment: &model::Segment, elsewhere: usize, prefix: &str) -> Result<usize, Error> {
    flagstream::validate::segment_measured(segment, elsewhere).map_err(|e| invalid(prefix, e))
}

/// Converts a segment (without validating it).
pub fn segment_model(segment: pb::Segment, prefix: &str) -> Result<model::Segment, Error> {
    model::Segment::try_from(segment).map_err(|e| invalid(prefix, e))
}

/// Validates a whole namespace written at once (an import), naming the
/// element an error is in under `prefix` (e.g. `bundle.flags[2]`).
pub fn bundle(
    flags: &[model::Flag],
    segments: &[model::Segment],
    names: Element,
    prefix: &str,
) -> Result<(), Error> {
    flagstream::validate::bundle_named(flags, segments, names).map_err(|e| invalid(prefix, e))
}

/// Checks the request-wide options.
pub fn comment(comment: &str) -> Result<(), Error> {
    flagstream::validate::comment(comment).map_err(|e| invalid("options", e))
}

/// An INVALID_ARGUMENT error whose path starts with `prefix` (e.g. `flag`).
fn invalid(prefix: &str, error: FieldError) -> Error {
    let error = if prefix.is_empty() {
        error
    } else {
        error.at(prefix)
    };
    Error::Invalid(error.to_string())
}

/// Whether any constraint is a REGEX one (only those cost regex memory).
pub fn has_regex<'a>(constraints: impl IntoIterator<Item = &'a model::Constraint>) -> bool {
    constraints
        .into_iter()
        .any(|c| c.operator == model::Operator::Regex)
}

/// What the compiled regexes of each namespace's flags and segments take, as
/// `flagstream::validate` counts them, so a write can be checked against
/// [`flagstream::validate::MAX_NAMESPACE_REGEX_BYTES`] without compiling the
/// rest of the namespace every time.
///
/// Owned by the writer thread, the only one that commits, so it follows the
/// store exactly: a namespace is counted from the store the first time a
/// write with regexes lands in it (compiling its regexes once, bounded by the
/// budget itself), then kept up to date with every committed write.
#[derive(Debug, Default)]
pub struct RegexUse {
    /// Namespace key to the objects holding regexes and what each takes.
    namespaces: HashMap<String, Held>,
}

/// One namespace's regex memory.
#[derive(Debug, Default)]
struct Held {
    /// Bytes by object; objects without regexes are absent.
    objects: HashMap<(pb::ObjectKind, String), usize>,
    /// The sum of `objects`.
    total: usize,
}

/// What a committed write changes in [`RegexUse`].
#[derive(Debug)]
pub enum RegexChange {
    /// The object now holds regexes taking this many bytes (0 for none).
    Set {
        namespace: String,
        kind: pb::ObjectKind,
        key: String,
        bytes: usize,
    },
    /// The object was deleted.
    Removed {
        namespace: String,
        kind: pb::ObjectKind,
        key: String,
    },
    /// The namespace was replaced or deleted: it is counted again from the
    /// store when next needed.
    Forget(String),
}

impl RegexUse {
    /// What the regexes of `namespace`'s objects other than `key` of `kind`
    /// take.
    pub fn others(
        &mut self,
        store: &Store,
        namespace: &str,
        kind: pb::ObjectKind,
        key: &str,
    ) -> Result<usize, Error> {
        if !self.namespaces.contains_key(namespace) {
            // A namespace that does not exist holds nothing (and the write
            // will be refused); it is not remembered.
            if store.namespace(namespace)?.is_none() {
                return Ok(0);
            }
            let held = Self::count(store, namespace)?;
            self.namespaces.insert(namespace.to_string(), held);
        }
        let held = &self.namespaces[namespace];
        let own = held
            .objects
            .get(&(kind, key.to_string()))
            .copied()
            .unwrap_or(0);
        Ok(held.total - own)
    }

    /// Records what a committed write changed. Namespaces not counted yet
    /// stay so: they are read from the store, which has the write, when needed.
    pub fn apply(&mut self, changes: Vec<RegexChange>) {
        for change in changes {
            match change {
                RegexChange::Set {
                    namespace,
                    kind,
                    key,
                    bytes,
                } => {
                    if let Some(held) = self.namespaces.get_mut(&namespace) {
                        held.set((kind, key), bytes);
                    }
                }
                RegexChange::Removed {
                    namespace,
                    kind,
                    key,
                } => {
                    if let Some(held) = self.namespaces.get_mut(&namespace) {
                        held.set((kind, key), 0);
                    }
                }
                RegexChange::Forget(namespace) => {
                    self.namespaces.remove(&namespace);
                }
            }
        }
    }

    /// Counts a namespace's regexes from the store.
    fn count(store: &Store, namespace: &str) -> Result<Held, Error> {
        let mut held = Held::default();
        for stored in store.flags_after(namespace, "") {
            let stored = stored?;
            let regexes = stored.rules.iter().flat_map(|r| &r.constraints);
            if !regexes
                .clone()
                .any(|c| c.operator == pb::Operator::Regex as i32)
            {
                continue;
            }
            let flag = model::Flag::try_from(stored).map_err(corrupt)?;
            let bytes = flagstream::validate::flag_regex_bytes(&flag);
            held.set((pb::ObjectKind::Flag, flag.key), bytes);
        }
        for stored in store.segments_after(namespace, "") {
            let stored = stored?;
            if !stored
                .constraints
                .iter()
                .any(|c| c.operator == pb::Operator::Regex as i32)
            {
                continue;
            }
            let segment = model::Segment::try_from(stored).map_err(corrupt)?;
            let bytes = flagstream::validate::segment_regex_bytes(&segment);
            held.set((pb::ObjectKind::Segment, segment.key), bytes);
        }
        Ok(held)
    }
}

impl Held {
    fn set(&mut self, object: (pb::ObjectKind, String), bytes: usize) {
        let old = if bytes == 0 {
            self.objects.remove(&object)
        } else {
            self.objects.insert(object, bytes)
        };
        self.total = self.total - old.unwrap_or(0) + bytes;
    }
}

/// A stored object that does not convert: it passed validation when written.
fn corrupt(e: FieldError) -> Error {
    Error::Store(StoreError::Corrupt(e.to_string()))
}
