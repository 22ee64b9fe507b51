//! The live end of the change stream, shared by every subscriber: the most
//! recent changes, each encoded once, and a `watch` of the head revision.
//!
//! The writer publishes each committed change here after it is durable.
//! Subscribers that are caught up read from the ring; ones that fall behind
//! it read the change log on disk instead (see `replication`), so the writer
//! never waits for any subscriber.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flagstream::pb;
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::watch;

use crate::store::LogRecord;

/// One change, encoded once for everybody.
#[derive(Debug, Clone)]
pub struct EncodedChange {
    pub revision: u64,
    /// The namespace the write touched.
    pub namespace: String,
    /// The encoded `pb::Change` with all its deltas.
    pub full: Bytes,
    /// The encoded `pb::Change` without deltas, for subscribers that do not
    /// follow `namespace`.
    pub empty: Bytes,
}

/// Recent changes and the head revision.
pub struct Feed {
    /// The last `capacity` changes, in revision order without gaps.
    ring: Mutex<VecDeque<EncodedChange>>,
    capacity: usize,
    /// The latest durable revision; subscribers wait on changes of it.
    head: watch::Sender<u64>,
    /// The highest revision compacted out of the change log.
    compacted: AtomicU64,
}

impl Feed {
    /// A feed starting at the store's `head`, keeping `capacity` changes.
    pub fn new(head: u64, compacted: u64, capacity: usize) -> Feed {
        Feed {
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity: capacity.max(1),
            head: watch::Sender::new(head),
            compacted: AtomicU64::new(compacted),
        }
    }

    /// Adds a durable change (called by the writer, in revision order).
    pub fn publish(&self, record: LogRecord) {
        let revision = record.revision;
        let change = encode(record);
        {
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(change);
        }
        self.head.send_replace(revision);
    }

    /// The latest durable revision.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Waits until `revision` is durable, for at most `limit`; whether it is.
    pub async fn wait_durable(&self, revision: u64, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.until_durable(revision))
            .await
            .is_ok()
    }

    /// Returns once `revision` is durable.
    pub async fn until_durable(&self, revision: u64) {
        let mut head = self.head.subscribe();
        // The sender lives in `self`, so the wait cannot end with an error.
        let _ = head.wait_for(|h| *h >= revision).await;
    }

    /// A receiver notified whenever the head moves.
    pub fn subscribe_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    pub fn compacted(&self) -> u64 {
        self.compacted.load(Ordering::Acquire)
    }

    pub fn set_compacted(&self, revision: u64) {
        self.compacted.store(revision, Ordering::Release);
    }

    /// The changes after `after`, up to `max`, if the ring still holds
    /// `after + 1`; `None` when the subscriber must read the disk log.
    pub fn after(&self, after: u64, max: usize) -> Option<Vec<EncodedChange>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let first = ring.front()?.revision;
        if after + 1 < first {
            return None;
        }
        let start = (after + 1 - first) as usize;
        Some(ring.iter().skip(start).take(max).cloned().collect())
    }
}

/// Encodes a change-log record as the stream's `Change`.
pub fn encode(record: LogRecord) -> EncodedChange {
    let deltas = record.entries.into_iter().filter_map(delta).collect();
    let full = pb::Change {
        revision: record.revision,
        time: record.time,
        deltas,
        chain: record.chain,
    };
    let empty = pb::Change {
        deltas: Vec::new(),
        ..full.clone()
    };
    EncodedChange {
        revision: record.revision,
        namespace: record.namespace,
        full: Bytes::from(full.encode_to_vec()),
        empty: Bytes::from(empty.encode_to_vec()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_durability_until_its_limit() {
        let feed = std::sync::Arc::new(Feed::new(3, 0, 8));
        assert!(
            feed.wait_durable(3, Duration::ZERO).await,
            "already durable"
        );
        assert!(
            !feed.wait_durable(4, Duration::from_millis(20)).await,
            "revision 4 never became durable"
        );
        let waiting = tokio::spawn({
            let feed = feed.clone();
            async move { feed.wait_durable(5, Duration::from_secs(30)).await }
        });
        feed.head.send_replace(4);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "4 is not 5");
        feed.head.send_replace(5);
        assert!(waiting.await.unwrap());
    }
}
