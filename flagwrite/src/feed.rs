//! The writer's side of the change stream's feed: each committed change, once
//! durable, is encoded here once for every subscriber and published to the
//! shared [`Feed`] (`flagstream::kit::replication`).
//!
//! Subscribers that are caught up read from the feed; ones that fall behind
//! it read the change log on disk instead (see `replication`), so the writer
//! never waits for any subscriber.

use flagstream::pb;

pub use flagstream::kit::replication::{EncodedChange, Feed};

use crate::store::LogRecord;

/// A feed for a store whose head is `head`, after `compacted`, keeping
/// `capacity` changes. The writer's history never changes while it runs: one
/// epoch.
pub fn new_feed(head: u64, compacted: u64, capacity: usize) -> Feed {
    Feed::new(1, head, compacted, capacity)
}

/// Encodes a change-log record as the stream's `Change`.
pub fn encode(record: LogRecord) -> EncodedChange {
    let deltas = record.entries.into_iter().filter_map(delta).collect();
    let change = pb::Change {
        revision: record.revision,
        time: record.time,
        deltas,
        chain: record.chain,
    };
    EncodedChange::new(&change, record.namespace)
}

/// The delta of one history entry: a put of the after image, or a delete.
fn delta(entry: pb::HistoryEntry) -> Option<pb::Delta> {
    use pb::delta::Kind as D;
    use pb::object::Kind as O;
    let kind = match (entry.after, &entry.before) {
        (Some(after), _) => match after.kind? {
            O::Namespace(n) => D::PutNamespace(n),
            O::Flag(f) => D::PutFlag(f),
            O::Segment(s) => D::PutSegment(s),
        },
        (None, Some(before)) => match before.kind.as_ref()? {
            O::Namespace(n) => D::DeleteNamespace(n.key.clone()),
            O::Flag(f) => D::DeleteFlag(pb::ObjectRef {
                namespace: f.namespace.clone(),
                key: f.key.clone(),
            }),
            O::Segment(s) => D::DeleteSegment(pb::ObjectRef {
                namespace: s.namespace.clone(),
                key: s.key.clone(),
            }),
        },
        (None, None) => return None,
    };
    Some(pb::Delta { kind: Some(kind) })
}
