//! The FlagAdmin service: authorization, request decoding and responses.
//! Writes go to the single [`Writer`]; reads go straight to the [`Store`] and
//! answer once what they read is durable.
//!
//! Nothing here reads sled or does heavy work on the async runtime's workers:
//! reads run on the blocking pool ([`Admin::read`]), validation and commits on
//! the writer thread, and decoding an import on the blocking pool. A read
//! that waits on the disk or decodes a page of objects then holds up no other
//! call.

use std::sync::Arc;

use flagstream::kit::auth::{self, Identity, Scope};
use flagstream::pb::flag_admin_server::FlagAdmin;
use flagstream::{model, pb};
use tonic::{Request, Response, Status};

use crate::checks;
use crate::error::Error;
use crate::feed::Feed;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::writer::{Op, Outcome, WriteRequest, Writer};

/// The FlagAdmin implementation.
#[derive(Clone)]
pub struct Admin {
    store: Store,
    writer: Writer,
    /// For the durable head, which reads wait on (see [`Admin::settle`]).
    feed: Arc<Feed>,
    metrics: Arc<Metrics>,
}

/// How long a read waits for what it saw to become durable before it answers UNAVAILABLE. A
/// flush takes milliseconds; only a store that can no longer flush (which refuses all writes)
/// gets near this.
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Page sizes: 0 means this, and at most `MAX_PAGE`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

impl Admin {
    pub fn new(store: Store, writer: Writer, feed: Arc<Feed>, metrics: Arc<Metrics>) -> Admin {
        Admin {
            store,
            writer,
            feed,
            metrics,
        }
    }

    /// Runs `read` on the blocking pool (sled may wait on the disk, and a page of objects takes
    /// decoding), then waits until everything it can have seen is durable (see
    /// [`Admin::settle`]) and returns what it read.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        let (value, committed) = tokio::task::spawn_blocking(move || {
            let value = read(&store)?;
            // Read after the read: the committed head covers everything it saw.
            let committed = store.head().map_err(Error::from)?;
            Ok::<_, Status>((value, committed))
        })
        .await
        .map_err(|e| Status::internal(format!("reading the store: {e}")))??;
        self.settle(committed).await?;
        Ok(value)
    }

    /// Called after a read, before answering: waits until everything the read can have seen is
    /// durable. The writer commits a group of writes, then flushes them once and only then
    /// acknowledges them; a read in between sees writes nobody was told about, which a crash
    /// would undo. Waiting until the durable head reaches `committed`, the committed head read
    /// after the read, covers every object and every absence the read saw. Returns at once
    /// unless writes are in flight, then within one flush.
    async fn settle(&self, committed: u64) -> Result<(), Status> {
        if self.feed.wait_durable(committed, SETTLE_LIMIT).await {
            Ok(())
        } else {
            Err(Status::unavailable(format!(
                "revision {committed} is committed but not yet durable after {SETTLE_LIMIT:?}: the store is not flushing"
            )))
        }
    }

    /// Runs a write for `rpc` and counts its outcome.
    async fn write(
        &self,
        rpc: &'static str,
        identity: &Identity,
        op: Op,
        options: Option<pb::WriteOptions>,
    ) -> Result<Outcome, Status> {
        let options = options.unwrap_or_default();
        let request = WriteRequest {
            op,
            actor: identity.name.clone(),
            comment: options.comment,
            validate_only: options.validate_only,
        };
        let result = self.writer.write(request).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.metrics.write(rpc, outcome);
        if let Err(e) = &result {
            tracing::debug!(rpc, error = %e, "write refused");
        }
        result.map_err(Status::from)
    }
}

/// NOT_FOUND for a namespace that does not exist.
fn namespace_not_found(namespace: &str) -> Status {
    Error::NotFound(format!(
        "namespace {} not found",
        flagstream::validate::shown(namespace)
    ))
    .into()
}

fn admin<T>(request: &Request<T>) -> Result<Arc<Identity>, Status> {
    auth::require(request, "write (needs scope admin)", |id| {
        id.scopes.contains(&Scope::Admin)
    })
}

fn reader<T>(request: &Request<T>) -> Result<Arc<Identity>, Status> {
    auth::require(
        request,
        "read admin data (needs scope admin or admin-read)",
        Identity::can_admin_read,
    )
}

/// The digest of the durable state's `namespaces` (all when empty), with
/// the revision and history position it was taken at.
fn state_digest(store: &Store, namespaces: &[String]) -> Result<pb::StateDigest, Status> {
    let snapshot = store.snapshot().map_err(Error::from)?;
    let covered = |ns: &str| namespaces.is_empty() || namespaces.iter().any(|n| n == ns);
    let corrupt = |e: flagstream::convert::FieldError| {
        Status::internal(format!("a stored object does not convert: {e}"))
    };
    let mut digest = flagstream::digest::Digest::default();
    for ns in snapshot.namespaces.into_iter().filter(|n| covered(&n.key)) {
        digest.add_namespace(&model::Namespace::try_from(ns).map_err(corrupt)?);
    }
    for flag in snapshot.flags.into_iter().filter(|f| covered(&f.namespace)) {
        digest.add_flag(&model::Flag::try_from(flag).map_err(corrupt)?);
    }
    for segment in snapshot
        .segments
        .into_iter()
        .filter(|s| covered(&s.namespace))
    {
        digest.add_segment(&model::Segment::try_from(segment).map_err(corrupt)?);
    }
    Ok(pb::StateDigest {
        revision: snapshot.revision,
        history_id: store.history_id().to_string(),
        chain: flagstream::digest::hex(&snapshot.chain),
        digest: digest.hex(),
        namespaces: Vec::new(),
        namespace_count: digest.namespaces,
        flag_count: digest.flags,
        segment_count: digest.segments,
    })
}

/// One page of `ListHistory`: the entries before revision `before` (skipping
/// the first `skip` entries of the record at `before - 1`) that match the
/// request's kind and key, newest first.
fn history_page(
    store: &Store,
    req: &pb::ListHistoryRequest,
    kind: pb::ObjectKind,
    size: usize,
    before: u64,
    skip: usize,
) -> Result<pb::ListHistoryResponse, Status> {
    let mut entries = Vec::new();
    let mut next_page_token = String::new();
    let records = store.history_before(before, &req.namespace, kind as i32, &req.key);
    'records: for record in records {
        let record = record.map_err(Error::from)?;
        let first = if record.revision.saturating_add(1) == before {
            skip
        } else {
            0
        };
        for (index, entry) in record.entries.iter().enumerate().skip(first) {
            if kind != pb::ObjectKind::Unspecified && entry.kind != kind as i32 {
                continue;
            }
            if !req.key.is_empty() && entry.key != req.key {
                continue;
            }
            if entries.len() == size {
                next_page_token = format!("{}.{index}", record.revision);
                break 'records;
            }
            let mut entry = entry.clone();
            entry.revision = record.revision;
            entry.time = record.time;
            entry.actor = record.actor.clone();
            entry.comment = record.comment.clone();
            entry.operation = record.operation.clone();
            entry.chain = record.chain.clone();
            entries.push(entry);
        }
    }
    Ok(pb::ListHistoryResponse {
        entries,
        next_page_token,
    })
}

/// The write an `ImportNamespace` request asks for: its bundle converted, or
/// its Unleash export read, into the model.
fn import_op(req: pb::ImportNamespaceRequest) -> Result<Op, Status> {
    Ok(match req.source {
        Some(pb::import_namespace_request::Source::Bundle(bundle)) => {
            // The objects' namespace fields are ignored in favour of the
            // request's, so they are replaced before conversion.
            let flags = bundle
                .flags
                .into_iter()
                .enumerate()
                .map(|(i, mut f)| {
                    f.namespace = req.namespace.clone();
                    checks::flag_model(f, &format!("bundle.flags[{i}]"))
                })
                .collect::<Result<_, _>>()?;
            let segments = bundle
                .segments
                .into_iter()
                .enumerate()
                .map(|(i, mut s)| {
                    s.namespace = req.namespace.clone();
                    checks::segment_model(s, &format!("bundle.segments[{i}]"))
                })
                .collect::<Result<_, _>>()?;
            Op::Import {
                namespace: req.namespace,
                description: bundle.namespace.map(|n| n.description),
                flags,
                segments,
                path: "bundle",
            }
        }
        Some(pb::import_namespace_request::Source::UnleashJson(json)) => {
            // The importer keeps what Unleash would silently turn off (an
            // unknown operator, a bad regex) so evaluation matches
            // Unleash; write-time validation then refuses it, naming the
            // feature and the field.
            let import = flagstream::unleash::import_features(&json, &req.namespace)
                .map_err(|e| Status::invalid_argument(format!("unleash_json: {e}")))?;
            Op::Import {
                namespace: req.namespace,
                description: None,
                flags: import.flags,
                segments: import.segments,
                path: "unleash_json",
            }
        }
        None => {
            return Err(Status::invalid_argument(
                "source: one of bundle or unleash_json is required",
            ));
        }
    })
}

fn page_size(requested: u32) -> Result<usize, Status> {
    match requested as usize {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        n => Err(Status::invalid_argument(format!(
            "page_size: {n} is more than {MAX_PAGE}"
        ))),
    }
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, Status> {
    value.ok_or_else(|| Status::invalid_argument(format!("{field}: required")))
}

fn flag_of(outcome: Outcome) -> pb::FlagResponse {
    let flag = match outcome.object.and_then(|o| o.kind) {
        Some(pb::object::Kind::Flag(f)) => Some(f),
        _ => None,
    };
    pb::FlagResponse {
        revision: outcome.revision,
        flag,
    }
}

fn segment_of(outcome: Outcome) -> pb::SegmentResponse {
    let segment = match outcome.object.and_then(|o| o.kind) {
        Some(pb::object::Kind::Segment(s)) => Some(s),
        _ => None,
    };
    pb::SegmentResponse {
        revision: outcome.revision,
        segment,
    }
}

#[tonic::async_trait]
impl FlagAdmin for Admin {
    async fn create_namespace(
        &self,
        request: Request<pb::CreateNamespaceRequest>,
    ) -> Result<Response<pb::NamespaceResponse>, Status> {
        let identity = admin(&request)?;
        let req = request.into_inner();
        let ns = required(req.namespace, "namespace")?;
        let outcome = self
            .write(
                "CreateNamespace",
                &identity,
                Op::CreateNamespace(ns),
                req.options,
            )
            .await?;
        let namespace = match outcome.object.and_then(|o| o.kind) {
            Some(pb::object::Kind::Namespace(n)) => Some(n),
            _ => None,
        };
        Ok(Response::new(pb::NamespaceResponse {
            revision: outcome.revision,
            namespace,
        }))
    }

    async fn list_namespaces(
        &self,
        request: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        reader(&request)?;
        let (revision, namespaces) = self
            .read(|store| {
                let revision = store.head().map_err(Error::from)?;
                Ok((revision, store.namespaces().map_err(Error::from)?))
            })
            .await?;
        Ok(Response::new(pb::ListNamespacesResponse {
            namespaces,
            revision,
        }))
    }

    async fn delete_namespace(
        &self,
        request: Request<pb::DeleteNamespaceRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let identity = admin(&request)?;
        let req = request.into_inner();
        let outcome = self
            .write(
                "DeleteNamespace",
                &identity,
                Op::DeleteNamespace { key: req.namespace },
                req.options,
            )
            .await?;
        Ok(Response::new(pb::WriteResponse {
            revision: outcome.revision,
        }))
    }

    async fn create_flag(
        &self,
        request: Request<pb::CreateFlagRequest>,
    ) -> Result<Response<pb::FlagResponse>, Status> {
        let identity = admin(&request)?;
        let req = request.into_inner();
        let flag = required(req.flag, "flag")?;
        Ok(Response::new(flag_of(
            self.write("CreateFlag", &identity, Op::CreateFlag(flag), req.options)
                .await?,
        )))
    }

    async fn update_flag(
        &self,
        request: Request<pb::UpdateFlagRequest>,
    ) -> Result<Response<pb::FlagResponse>, Status> {
        let identity = admin(&request)?;
        let req = request.into_inner();
        let flag = required(req.flag, "flag")?;
        let op = Op::UpdateFlag {
            flag,
            expected: req.expected_revision,
        };
        Ok(Response::new(flag_of(
            self.write("UpdateFlag", &identity, op, req.options).await?,
        )))
    }

    async fn set_flag_enabled(
        &self,
        request: Request<pb::SetFlagEnabledRequest>,
    ) -> Result<Response<pb::FlagResponse>, Status> {
        let identity = admin(&request)?;
        let req = request.into_inner();
        let op = Op::SetFlagEnabled {
            namespace: req.namespace,
            key: req.key,
            enabled: req.enabled,
            expected: req.expected_revision,
        };
        Ok(Response::new(flag_of(
            self.write("SetFlagEnabled", &identity, op, req.options)
                .await?,
        )))
    }

    async fn delete_flag(
        &self,
        request: Request<pb::DeleteFlagRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let identity = admin(&request)?;
        let req = request.into_inner();
        let op = Op::DeleteFlag {
            namespace: req.namespace,
            key: req.key,
            expected: req.expected_revision,
        };
        let outcome = self.write("DeleteFlag", &identity, op, req.options).await?;
        Ok(Response::new(pb::WriteResponse {
            revision: outcome.revision,
        }))
    }

    async fn get_flag(
        &self,
        request: Request<pb::GetFlagRequest>,
    ) -> Result<Response<pb::Flag>, Status> {
        reader(&request)?;
        let req = request.into_inner();
        let (namespace, key) = (req.namespace.clone(), req.key.clone());
        let found = self
            .read(move |store| Ok(store.flag(&namespace, &key).map_err(Error::from)?))
            .await?;
        match found {
            Some(flag) => Ok(Response::new(flag)),
            None => Err(Error::NotFound(format!(
                "flag {} not found in namespace {}",
                flagstream::validate::shown(&req.key),
                flagstream::validate::shown(&req.namespace)
            ))
            .into()),
        }
    }

    async fn list_flags(
        &self,
        request: Request<pb::ListFlagsRequest>,
    ) -> Result<Response<pb::ListFlagsResponse>, Status> {
        reader(&request)?;
        let req = request.into_inner();
        let size = page_size(req.page_size)?;
        let namespace = req.namespace.clone();
        let page = self
            .read(move |store| {
                if store
                    .namespace(&req.namespace)
                    .map_err(Error::from)?
                    .is_none()
                {
                    return Ok(None);
                }
                let mut flags = Vec::new();
                let mut next_page_token = String::new();
                for flag in
                    store.flags_with_prefix(&req.namespace, &req.key_prefix, &req.page_token)
                {
                    let flag = flag.map_err(Error::from)?;
                    if !req.tag.is_empty() && !flag.tags.contains(&req.tag) {
                        continue;
                    }
                    if flags.len() == size {
                        next_page_token = flags
                            .last()
                            .map(|f: &pb::Flag| f.key.clone())
                            .unwrap_or_default();
                        break;
                    }
                    flags.push(flag);
                }
                Ok(Some(pb::ListFlagsResponse {
                    flags,
                    next_page_token,
                }))
            })
            .await?;
        page.map(Response::new)
            .ok_or_else(|| namespace_not_found(&namespace))
    }

    async fn create_segment(
        &self,
        request: Request<pb::CreateSegmentRequest>,
    ) -> Result<Response<pb::SegmentResponse>, Status> {
        let identity = admin(&request)?;
        let req = request.into_inner();
        let segment = required(req.segment, "segment")?;
        Ok(Response::new(segment_of(
            self.write(
                "CreateSegment",
                &identity,
                Op::CreateSegment(segment),
                req.options,
            )
            .await?,
        )))
    }

    async fn update_segment(
        &self,
        request: Request<pb::UpdateSegmentRequest>,
    ) -> Result<Response<pb::SegmentResponse>, Status> {
        let identity = admin(&request)?;
        let req = request.into_inner();
        let segment = required(req.segment, "segment")?;
        let op = Op::UpdateSegment {
            segment,
            expected: req.expected_revision,
        };
        Ok(Response::new(segment_of(
            self.write("UpdateSegment", &identity, op, req.options)
                .await?,
        )))
    }

    async fn delete_segment(
        &self,
        request: Request<pb::DeleteSegmentRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let identity = admin(&request)?;
        let req = request.into_inner();
        let op = Op::DeleteSegment {
            namespace: req.namespace,
            key: req.key,
            expected: req.expected_revision,
        };
        let outcome = self
            .write("DeleteSegment", &identity, op, req.options)
            .await?;
        Ok(Response::new(pb::WriteResponse {
            revision: outcome.revision,
        }))
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::Segment>, Status> {
        reader(&request)?;
        let req = request.into_inner();
        let (namespace, key) = (req.namespace.clone(), req.key.clone());
        let found = self
            .read(move |store| Ok(store.segment(&namespace, &key).map_err(Error::from)?))
            .await?;
        match found {
            Some(segment) => Ok(Response::new(segment)),
            None => Err(Error::NotFound(format!(
                "segment {} not found in namespace {}",
                flagstream::validate::shown(&req.key),
                flagstream::validate::shown(&req.namespace)
            ))
            .into()),
        }
    }

    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        reader(&request)?;
        let req = request.into_inner();
        let size = page_size(req.page_size)?;
        let namespace = req.namespace.clone();
        let page = self
            .read(move |store| {
                if store
                    .namespace(&req.namespace)
                    .map_err(Error::from)?
                    .is_none()
                {
                    return Ok(None);
                }
                let mut segments: Vec<pb::Segment> = Vec::new();
                let mut next_page_token = String::new();
                for segment in store.segments_after(&req.namespace, &req.page_token) {
                    let segment = segment.map_err(Error::from)?;
                    if segments.len() == size {
                        next_page_token =
                            segments.last().map(|s| s.key.clone()).unwrap_or_default();
                        break;
                    }
                    segments.push(segment);
                }
                Ok(Some(pb::ListSegmentsResponse {
                    segments,
                    next_page_token,
                }))
            })
            .await?;
        page.map(Response::new)
            .ok_or_else(|| namespace_not_found(&namespace))
    }

    async fn list_history(
        &self,
        request: Request<pb::ListHistoryRequest>,
    ) -> Result<Response<pb::ListHistoryResponse>, Status> {
        reader(&request)?;
        let req = request.into_inner();
        let size = page_size(req.page_size)?;
        if req.namespace.is_empty() {
            return Err(Status::invalid_argument("namespace: required"));
        }
        let kind = pb::ObjectKind::try_from(req.kind)
            .map_err(|_| Status::invalid_argument(format!("kind: unknown value {}", req.kind)))?;
        if !req.key.is_empty() && kind == pb::ObjectKind::Unspecified {
            return Err(Status::invalid_argument("kind: required when key is set"));
        }
        // The page token is `<revision>.<entry index>` of the next entry.
        let (before, skip) = if req.page_token.is_empty() {
            (u64::MAX, 0)
        } else {
            let parsed = req
                .page_token
                .split_once('.')
                .and_then(|(r, i)| Some((r.parse::<u64>().ok()?, i.parse::<usize>().ok()?)));
            let (revision, index) = parsed.ok_or_else(|| {
                Status::invalid_argument("page_token: not a token this server issued")
            })?;
            (revision.saturating_add(1), index)
        };
        let page = self
            .read(move |store| history_page(store, &req, kind, size, before, skip))
            .await?;
        Ok(Response::new(page))
    }

    async fn export_namespace(
        &self,
        request: Request<pb::ExportNamespaceRequest>,
    ) -> Result<Response<pb::ExportNamespaceResponse>, Status> {
        reader(&request)?;
        let namespace = request.into_inner().namespace;
        let wanted = namespace.clone();
        let exported = self
            .read(move |store| {
                // One consistent revision for the whole bundle, reading only this namespace.
                let Some(snapshot) = store.namespace_snapshot(&wanted).map_err(Error::from)? else {
                    return Ok(None);
                };
                let bundle = pb::NamespaceBundle {
                    namespace: snapshot.namespaces.into_iter().next(),
                    flags: snapshot.flags,
                    segments: snapshot.segments,
                };
                Ok(Some(pb::ExportNamespaceResponse {
                    revision: snapshot.revision,
                    bundle: Some(bundle),
                }))
            })
            .await?;
        exported
            .map(Response::new)
            .ok_or_else(|| namespace_not_found(&namespace))
    }

    async fn import_namespace(
        &self,
        request: Request<pb::ImportNamespaceRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let identity = admin(&request)?;
        let req = request.into_inner();
        let options = req.options.clone();
        // Decoding up to 4 MiB of JSON or converting thousands of objects is
        // heavy: it runs on the blocking pool.
        let op = tokio::task::spawn_blocking(move || import_op(req))
            .await
            .map_err(|e| Status::internal(format!("decoding the import: {e}")))??;
        let outcome = self
            .write("ImportNamespace", &identity, op, options)
            .await?;
        Ok(Response::new(pb::WriteResponse {
            revision: outcome.revision,
        }))
    }

    async fn get_state_digest(
        &self,
        request: Request<pb::GetStateDigestRequest>,
    ) -> Result<Response<pb::StateDigest>, Status> {
        reader(&request)?;
        let mut namespaces = request.into_inner().namespaces;
        namespaces.sort();
        namespaces.dedup();
        let covered = namespaces.clone();
        let digest = self
            .read(move |store| state_digest(store, &covered))
            .await?;
        Ok(Response::new(pb::StateDigest {
            namespaces,
            ..digest
        }))
    }
}
