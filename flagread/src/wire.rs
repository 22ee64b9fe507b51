//! The replication edge: replication messages into the replica's model types (for the follower),
//! and a whole state into replication messages and back (for the snapshot file, which is the
//! same `SyncMessage` sequence the writer sends: SnapshotBegin, SnapshotChunk..., SnapshotEnd).

use std::io::{Read, Write};
use std::path::Path;

use flagstream::convert::FieldError;
use flagstream::model;
use flagstream::pb;
use flagstream::pb::delta::Kind as DeltaKind;
use flagstream::pb::sync_message::Kind;
use prost::Message;

use crate::state::{Change, Delta, History, SnapshotBuilder};

/// Objects per chunk when writing a snapshot file; small enough to keep each message far below
/// the decoder's limits, large enough that framing costs nothing.
const OBJECTS_PER_CHUNK: usize = 1000;

/// Why a replication message or the snapshot file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// An object the writer sent does not convert into the model (a version skew, since the
    /// writer validates everything it stores).
    #[error("revision {revision}: {error}")]
    Convert { revision: u64, error: FieldError },
    /// A delta with no kind set.
    #[error("revision {revision}: a delta has no kind")]
    EmptyDelta { revision: u64 },
    /// The snapshot file could not be read or written.
    #[error("snapshot file {path}: {error}")]
    Io { path: String, error: std::io::Error },
    /// The snapshot file is not a complete snapshot.
    #[error("snapshot file {path}: {reason}")]
    Corrupt { path: String, reason: String },
}

/// Converts a replicated change into the model.
pub fn change(change: pb::Change) -> Result<Change, WireError> {
    let revision = change.revision;
    let convert = |error| WireError::Convert { revision, error };
    let mut deltas = Vec::with_capacity(change.deltas.len());
    for delta in change.deltas {
        let delta = match delta.kind.ok_or(WireError::EmptyDelta { revision })? {
            DeltaKind::PutNamespace(ns) => {
                Delta::PutNamespace(model::Namespace::try_from(ns).map_err(convert)?)
            }
            DeltaKind::DeleteNamespace(key) => Delta::DeleteNamespace(key),
            DeltaKind::PutFlag(flag) => {
                Delta::PutFlag(model::Flag::try_from(flag).map_err(convert)?)
            }
            DeltaKind::DeleteFlag(r) => Delta::DeleteFlag {
                namespace: r.namespace,
                key: r.key,
            },
            DeltaKind::PutSegment(s) => {
                Delta::PutSegment(model::Segment::try_from(s).map_err(convert)?)
            }
            DeltaKind::DeleteSegment(r) => Delta::DeleteSegment {
                namespace: r.namespace,
                key: r.key,
            },
        };
        deltas.push(delta);
    }
    Ok(Change {
        revision,
        chain: change.chain,
        deltas,
    })
}

/// Adds the objects of one snapshot chunk to the snapshot being received.
pub fn add_chunk(
    snapshot: &mut SnapshotBuilder,
    chunk: pb::SnapshotChunk,
) -> Result<(), WireError> {
    let revision = snapshot.revision;
    let convert = |error| WireError::Convert { revision, error };
    for ns in chunk.namespaces {
        snapshot
            .namespaces
            .push(model::Namespace::try_from(ns).map_err(convert)?);
    }
    for segment in chunk.segments {
        snapshot
            .segments
            .push(model::Segment::try_from(segment).map_err(convert)?);
    }
    for flag in chunk.flags {
        snapshot
            .flags
            .push(model::Flag::try_from(flag).map_err(convert)?);
    }
    Ok(())
}

/// Writes `snapshot` to `path` atomically: into a temporary file beside it, synced, then renamed
/// over it, so a crash leaves either the old file or the new one, never half of one.
pub fn write_snapshot_file(path: &Path, snapshot: SnapshotBuilder) -> Result<(), WireError> {
    let io = |error| WireError::Io {
        path: path.display().to_string(),
        error,
    };
    let tmp = path.with_extension("tmp");
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut out = std::io::BufWriter::new(file);
    let mut buf = Vec::new();
    let mut emit = |kind: Kind, out: &mut std::io::BufWriter<std::fs::File>| {
        buf.clear();
        let message = pb::SyncMessage { kind: Some(kind) };
        message
            .encode_length_delimited(&mut buf)
            .expect("a Vec grows as needed");
        out.write_all(&buf)
    };
    let revision = snapshot.revision;
    emit(Kind::SnapshotBegin(begin(&snapshot)), &mut out).map_err(io)?;
    emit(
        Kind::SnapshotChunk(pb::SnapshotChunk {
            namespaces: snapshot
                .namespaces
                .into_iter()
                .map(pb::Namespace::from)
                .collect(),
            ..Default::default()
        }),
        &mut out,
    )
    .map_err(io)?;
    let mut segments = snapshot.segments.into_iter().peekable();
    while segments.peek().is_some() {
        let segments = segments
            .by_ref()
            .take(OBJECTS_PER_CHUNK)
            .map(pb::Segment::from)
            .collect();
        emit(
            Kind::SnapshotChunk(pb::SnapshotChunk {
                segments,
                ..Default::default()
            }),
            &mut out,
        )
        .map_err(io)?;
    }
    let mut flags = snapshot.flags.into_iter().peekable();
    while flags.peek().is_some() {
        let flags = flags
            .by_ref()
            .take(OBJECTS_PER_CHUNK)
            .map(pb::Flag::from)
            .collect();
        emit(
            Kind::SnapshotChunk(pb::SnapshotChunk {
                flags,
                ..Default::default()
            }),
            &mut out,
        )
        .map_err(io)?;
    }
    emit(Kind::SnapshotEnd(pb::SnapshotEnd { revision }), &mut out).map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    // The rename is durable only once the directory is.
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// The `SnapshotBegin` that describes `snapshot`: its revision, history and coverage.
fn begin(snapshot: &SnapshotBuilder) -> pb::SnapshotBegin {
    pb::SnapshotBegin {
        revision: snapshot.revision,
        history_id: snapshot.history.id.clone(),
        chain: snapshot.history.chain.clone(),
        namespaces: snapshot.covers.iter().flatten().cloned().collect(),
    }
}

/// The snapshot a `SnapshotBegin` starts (without its objects).
pub fn begun(begin: pb::SnapshotBegin) -> SnapshotBuilder {
    SnapshotBuilder {
        revision: begin.revision,
        history: History {
            id: begin.history_id,
            chain: begin.chain,
        },
        covers: (!begin.namespaces.is_empty()).then(|| begin.namespaces.into_iter().collect()),
        ..Default::default()
    }
}

/// Reads a snapshot file written by [`write_snapshot_file`]. `Ok(None)` when there is none.
pub fn read_snapshot_file(path: &Path) -> Result<Option<SnapshotBuilder>, WireError> {
    let display = path.display().to_string();
    let mut bytes = Vec::new();
    match std::fs::File::open(path) {
        Ok(mut file) => file
            .read_to_end(&mut bytes)
            .map_err(|error| WireError::Io {
                path: display.clone(),
                error,
            })?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(WireError::Io {
                path: display,
                error,
            });
        }
    };
    let corrupt = |reason: String| WireError::Corrupt {
        path: display.clone(),
        reason,
    };
    let mut rest = bytes.as_slice();
    let mut snapshot: Option<SnapshotBuilder> = None;
    while !rest.is_empty() {
        let message = pb::SyncMessage::decode_length_delimited(&mut rest)
            .map_err(|e| corrupt(e.to_string()))?;
        match (message.kind, snapshot.as_mut()) {
            (Some(Kind::SnapshotBegin(begin)), None) => snapshot = Some(begun(begin)),
            (Some(Kind::SnapshotChunk(chunk)), Some(building)) => {
                add_chunk(building, chunk)?;
            }
            (Some(Kind::SnapshotEnd(end)), Some(building)) if end.revision == building.revision => {
                if !rest.is_empty() {
                    return Err(corrupt("data after the end of the snapshot".into()));
                }
                return Ok(snapshot);
            }
            (kind, _) => {
                return Err(corrupt(format!(
                    "unexpected {} message",
                    kind_name(kind.as_ref())
                )));
            }
        }
    }
    Err(corrupt("the snapshot has no end (truncated)".into()))
}

/// A short name for a message kind, for errors (the message itself may be large).
fn kind_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        None => "empty",
        Some(Kind::SnapshotBegin(_)) => "SnapshotBegin",
        Some(Kind::SnapshotChunk(_)) => "SnapshotChunk",
        Some(Kind::SnapshotEnd(_)) => "SnapshotEnd",
        Some(Kind::Change(_)) => "Change",
        Some(Kind::Heartbeat(_)) => "Heartbeat",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(ns: &str, key: &str) -> model::Flag {
        let variant = model::Variant {
            name: "on".into(),
            value: model::Value::Bool(true),
            description: String::new(),
        };
        model::Flag {
            namespace: ns.into(),
            key: key.into(),
            description: "d".into(),
            flag_type: model::FlagType::Boolean,
            variants: vec![variant],
            enabled: true,
            disabled_variant: "on".into(),
            default_variant: "on".into(),
            rules: vec![],
            prerequisites: vec![],
            tags: vec!["t".into()],
            metadata: Default::default(),
            stamp: model::Stamp {
                created_revision: 1,
                updated_revision: 2,
                updated_at_ms: 0,
                updated_by: "ops".into(),
            },
        }
    }

    #[test]
    fn snapshot_file_round_trips_and_refuses_truncation() {
        let dir = std::env::temp_dir().join(format!("flagread-wire-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.pb");
        assert!(
            read_snapshot_file(&path).unwrap().is_none(),
            "no file is no snapshot"
        );
        let snapshot = SnapshotBuilder {
            revision: 42,
            history: History {
                id: "h".into(),
                chain: vec![7; 16],
            },
            covers: Some(["prod".to_string()].into()),
            namespaces: vec![model::Namespace {
                key: "prod".into(),
                description: "p".into(),
                stamp: Default::default(),
            }],
            // More than one chunk's worth.
            flags: (0..2500)
                .map(|i| flag("prod", &format!("f{i:04}")))
                .collect(),
            segments: vec![model::Segment {
                namespace: "prod".into(),
                key: "s".into(),
                description: String::new(),
                constraints: vec![],
                stamp: Default::default(),
            }],
        };
        write_snapshot_file(&path, snapshot.clone()).unwrap();
        assert_eq!(read_snapshot_file(&path).unwrap(), Some(snapshot));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let error = read_snapshot_file(&path).unwrap_err().to_string();
        assert!(error.contains("state.pb"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
