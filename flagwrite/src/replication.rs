//! The Replication service as flagwrite serves it: the change stream replicas follow, served by
//! `flagstream::kit::replication` from the writer's store.
//!
//! The writer is the source of truth: its feed holds the last few thousand durable changes,
//! encoded once; subscribers further behind read the change log on disk; snapshots are the
//! store's bytes (no decoding), taken on the blocking pool and shared by the subscribers that
//! ask at about the same time. Its history never changes while it runs, so its feed has one epoch; a subscriber
//! ahead of its head holds another history and gets a snapshot.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use flagstream::kit::replication::{
    self, ChunkField, ChunkWriter, EncodedChange, EncodedSnapshot, Feed, Source,
};
use flagstream::pb;
use tonic::Status;

pub use flagstream::kit::replication::{
    ReplicationServer, StreamConfig, Subscribers, Wire, WireMessage,
};

use crate::feed::encode;
use crate::store::Store;

/// The Replication service over the writer's store.
pub type Replication = replication::Replication<WriterSource>;

/// What the writer serves the stream from: its store and its feed.
pub struct WriterSource {
    store: Store,
    feed: Arc<Feed>,
}

impl WriterSource {
    pub fn new(store: Store, feed: Arc<Feed>) -> WriterSource {
        WriterSource { store, feed }
    }
}

impl Source for WriterSource {
    fn feed(&self) -> &Feed {
        &self.feed
    }

    fn check_namespaces(&self, _namespaces: Option<&BTreeSet<String>>) -> Result<(), Status> {
        // The writer holds every namespace; one that does not exist yet is followed from its
        // creation.
        Ok(())
    }

    fn snapshot(
        &self,
        namespaces: Option<&BTreeSet<String>>,
        chunk_bytes: usize,
    ) -> Result<EncodedSnapshot, String> {
        // The stored bytes are the encoded objects: they go into the chunks as they are, with
        // no decoding and no copy beyond the chunks themselves.
        let raw = self
            .store
            .raw_snapshot(namespaces)
            .map_err(|e| e.to_string())?;
        let mut chunks = ChunkWriter::new(chunk_bytes);
        for (field, values) in [
            (ChunkField::Namespace, &raw.namespaces),
            (ChunkField::Segment, &raw.segments),
            (ChunkField::Flag, &raw.flags),
        ] {
            for value in values {
                chunks.push_encoded(field, value);
            }
        }
        Ok(EncodedSnapshot::new(
            raw.revision,
            raw.chain,
            self.store.history_id().to_string(),
            namespaces,
            chunks,
        ))
    }

    fn position(&self, revision: u64) -> Result<Option<Vec<u8>>, String> {
        self.store.position(revision).map_err(|e| e.to_string())
    }

    fn read_log(
        &self,
        after: u64,
        head: u64,
        max: usize,
    ) -> Result<Option<Vec<EncodedChange>>, String> {
        let mut out = Vec::new();
        for record in self.store.log_after(after).take(max) {
            let record = record.map_err(|e| e.to_string())?;
            if record.revision > head {
                break;
            }
            out.push(encode(record));
        }
        Ok(Some(out).filter(|out| !out.is_empty()))
    }

    fn heartbeat(&self) -> pb::Heartbeat {
        pb::Heartbeat {
            head_revision: self.feed.head(),
            time: Some(SystemTime::now().into()),
            history_id: self.store.history_id().to_string(),
            silence_ms: 0,
        }
    }

    fn beats(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    fn may_reach(&self, _revision: u64) -> bool {
        false
    }
}
